-- decant demo: continuous write load on the sample database
-- (scripts/demo/sample.sql), as a pgbench custom script:
--
--   pgbench -n -f scripts/demo/load.sql -c 2 -T 60 <db>
--
-- Every statement succeeds at any moment: new keys come from identity
-- columns and sequences, updates and deletes of rows that are already gone
-- simply touch nothing, and values stay inside the CHECKs, domains and enum.
-- No deadlocks between clients either: a multi-statement transaction touches
-- at most one existing row per table, always in the same table order; every
-- other statement runs in its own transaction.
--
-- One script run ("transaction" in pgbench's report) does roughly:
--   orders:       1 insert (+1-3 order_items), 1 update, 1 delete in 10
--   customers:    1 update (composite field, money, text[]; trigger)
--   products:     1 price update (the rule writes ops.price_history)
--   documents:    1 update without touching the TOASTed body,
--                 1 update that rewrites the body, 1 insert / 1 delete in 20
--   ops.events:   1 insert, 1 update, 1 delete in 5 (no key, REPLICA IDENTITY FULL)
--   ops.metrics:  1 insert, 1 update moving that row +31 days (to the next
--                 partition unless already in the default one), 1 update,
--                 1 delete in 5 (partitioned)
--   hr.employees: a department-wide raise (procedure, ~250 rows), 1 in 20
--   shop.daily_sales: REFRESH MATERIALIZED VIEW CONCURRENTLY, 1 in 500

\set cid random(1, 50000)
\set cid2 random(1, 50000)
\set pid random(1, 2000)
\set pid2 random(1, 2000)
\set oid random(1, 200000)
\set oid2 random(1, 200000)
\set lines random(1, 3)
\set cents random(100, 99999)
\set st random(1, 5)
\set did random(1, 3000)
\set did2 random(1, 3000)
\set did3 random(1, 3000)
\set words random(100, 312)
\set eseq random(1, 20000)
\set eseq2 random(1, 20000)
\set mid random(1, 100000)
\set mid3 random(1, 100000)
\set secs random(0, 16000000)
\set host random(0, 15)
\set dept random(1, 20)
\set dice random(1, 20)
\set rare random(1, 500)

-- A new order with its lines, a change to an existing order, a change to a
-- customer: one transaction.
BEGIN;
WITH o AS (
    INSERT INTO shop.orders (customer_id, total, discount, ship_within, notes)
    VALUES (:cid,
            :cents / 100.0,
            CASE WHEN :cents % 5 = 0 THEN round(:cents / 1000.0, 2) ELSE 0 END,
            make_interval(days => 1 + :cents % 7),
            'pgbench client ' || :client_id)
    RETURNING id
)
INSERT INTO shop.order_items (order_id, line_no, product_id, quantity, unit_price)
SELECT o.id, l, p.id, l, p.price
  FROM o
 CROSS JOIN generate_series(1, :lines) AS l
  JOIN shop.products p ON p.id = 1 + (:pid + 7 * l) % 2000;
UPDATE shop.orders
   SET status = (enum_range(NULL::shop.order_status))[:st],
       total = total + 1
 WHERE id = :oid;
UPDATE shop.customers
   SET address.city = (ARRAY['Lisbon', 'Porto', 'Faro', 'Braga', 'Coimbra'])[1 + :cents % 5],
       credit = credit + (:cents / 100.0)::numeric::money,
       tags = (ARRAY['vip', 'newsletter', 'wholesale', 'b2b', 'returns'])[1 + :cents % 5 : 2 + :cents % 5]
 WHERE id = :cid2;
END;

-- Product price change: the rule shop.products_price_history inserts into
-- ops.price_history in the same transaction.
UPDATE shop.products
   SET price = greatest(price + (:cents % 201 - 100) / 100.0, 0)
 WHERE id = :pid2;

-- TOAST: an update that leaves the out-of-line body untouched ...
UPDATE shop.documents
   SET revision = revision + 1,
       title = 'Contract #' || id || ' rev ' || (revision + 1)
 WHERE id = :did;

-- ... and one that replaces it with a new incompressible 3.2-10 kB value.
UPDATE shop.documents
   SET body = (SELECT string_agg(md5(:did2 || '-' || :cents || '-' || j), '' ORDER BY j)
                 FROM generate_series(1, :words) AS j),
       revision = revision + 1
 WHERE id = :did2;

\if :dice = 1
INSERT INTO shop.documents (customer_id, title, body)
SELECT :cid, 'Contract by client ' || :client_id,
       string_agg(md5(:cid || '/' || :cents || '/' || j), '' ORDER BY j)
  FROM generate_series(1, :words) AS j;
\elif :dice = 2
DELETE FROM shop.documents WHERE id = :did3;
\endif

\if :dice <= 2
-- order_items go with it (ON DELETE CASCADE).
DELETE FROM shop.orders WHERE id = :oid2;
\endif

-- The keyless table (REPLICA IDENTITY FULL; seq is not unique, and 100
-- seq values start out as pairs of identical rows).
INSERT INTO ops.events (host, level, message, payload)
VALUES ('host-' || :host,
        'info',
        'order placed by client ' || :client_id,
        jsonb_build_object('customer', :cid, 'lines', :lines));
UPDATE ops.events
   SET level = 'warning',
       message = 'acknowledged by client ' || :client_id
 WHERE seq = :eseq;
\if :dice <= 4
DELETE FROM ops.events WHERE seq = :eseq2;
\endif

-- The partitioned table: new rows land in any partition, the default one
-- included (after 2024-07-01). The row just inserted is then moved to a
-- later partition (an UPDATE of the partition key: a delete from one leaf and
-- an insert into another). Only this session touches that row: an UPDATE or
-- DELETE racing with a cross-partition move of the same row fails ("tuple to
-- be updated was already moved to another partition"), and the random
-- updates and deletes below only reach the original ids 1..100000.
INSERT INTO ops.metrics (recorded_at, host, name, value)
VALUES (timestamptz '2024-01-01 UTC' + :secs * interval '1 second',
        'host-' || :host,
        (ARRAY['cpu', 'mem', 'disk', 'net_in', 'net_out'])[1 + :cents % 5],
        :cents / 100.0 - 500)
RETURNING id AS new_metric_id \gset
UPDATE ops.metrics
   SET recorded_at = recorded_at + interval '31 days'
 WHERE id = :new_metric_id;
UPDATE ops.metrics SET value = value + 1 WHERE id = :mid;
\if :dice <= 4
DELETE FROM ops.metrics WHERE id = :mid3;
\endif

\if :dice = 5
CALL hr.give_raise(:dept, 10);
\endif

\if :rare = 1
CALL ops.refresh_reports();
\endif
