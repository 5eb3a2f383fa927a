-- decant demo: sample source database.
--
-- Creates three schemas (shop, hr, ops) with one of nearly every kind of
-- schema object and ~780k rows of deterministic data (no random(): every
-- value comes from md5 of its row number, so two runs give identical data).
-- Run as superuser on an empty PostgreSQL 15 database:
--
--   psql -v ON_ERROR_STOP=1 -d <db> -f scripts/demo/sample.sql
--
-- scripts/demo/load.sql (pgbench) then writes to these tables continuously.
--
-- Edge cases this exercises for a migration:
--   * GENERATED ALWAYS identity columns (shop.customers, hr.employees,
--     ops.price_history) and identity/serial/standalone sequences whose
--     values must be carried over (setval below);
--   * a STORED generated column (shop.orders.net_total);
--   * TOASTed, incompressible text (shop.documents.body, 3.2-10 kB);
--   * a table without any key, REPLICA IDENTITY FULL, holding 100 pairs of
--     byte-identical duplicate rows (ops.events);
--   * a range-partitioned table with a default partition that has rows
--     (ops.metrics);
--   * a rule that writes into another table (shop.products ->
--     ops.price_history) and BEFORE UPDATE triggers (updated_at);
--   * types from an extension (citext) used by a domain, used by two tables
--     in two schemas; an operator class from an extension (pg_trgm) in an
--     index.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;

CREATE EXTENSION IF NOT EXISTS citext;
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE SCHEMA shop;
CREATE SCHEMA hr;
CREATE SCHEMA ops;
COMMENT ON SCHEMA shop IS 'Web shop: customers, products, orders';

------------------------------------------------------------------------------
-- Types, domains, sequences
------------------------------------------------------------------------------

CREATE TYPE shop.order_status AS ENUM
    ('pending', 'paid', 'shipped', 'delivered', 'cancelled');

CREATE TYPE shop.address AS (
    street      text,
    city        text,
    postal_code text,
    country     char(2)
);

CREATE DOMAIN shop.email AS citext
    CHECK (VALUE ~ '^[^@ ]+@[^@ ]+\.[a-z]+$');

CREATE DOMAIN shop.positive_qty AS integer
    NOT NULL
    CHECK (VALUE > 0);

-- A range type over a subtype that has no built-in range.
CREATE TYPE hr.timerange AS RANGE (subtype = time);

-- Standalone sequences used by DEFAULT nextval(...).
CREATE SEQUENCE shop.order_no_seq START 1000001;
CREATE SEQUENCE ops.event_seq;

------------------------------------------------------------------------------
-- Functions, operator, aggregate, procedures
------------------------------------------------------------------------------

-- Deterministic pseudo-random number in [0, 2^60) from a seed string.
CREATE FUNCTION ops.hash_int(seed text) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT ('x' || left(md5(seed), 15))::bit(60)::bigint $$;

-- a %% b: a as a percentage of b (NULL when b is 0). SQL-standard body.
CREATE FUNCTION shop.pct(part numeric, whole numeric) RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT round(100 * part / NULLIF(whole, 0), 2);
END;

CREATE OPERATOR shop.%% (
    LEFTARG = numeric,
    RIGHTARG = numeric,
    FUNCTION = shop.pct
);

-- Aggregate: largest absolute value.
CREATE FUNCTION ops.absmax_step(state double precision, val double precision)
    RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN val IS NULL THEN state
        WHEN state IS NULL OR abs(val) > state THEN abs(val)
        ELSE state
    END
$$;

CREATE AGGREGATE ops.absmax(double precision) (
    SFUNC = ops.absmax_step,
    STYPE = double precision,
    COMBINEFUNC = ops.absmax_step,
    PARALLEL = SAFE
);

-- Trigger function: maintain updated_at.
CREATE FUNCTION shop.touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE FUNCTION shop.customer_lifetime_value(p_customer bigint) RETURNS numeric
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v numeric;
BEGIN
    SELECT coalesce(sum(o.net_total), 0) INTO v
      FROM shop.orders o
     WHERE o.customer_id = p_customer
       AND o.status <> 'cancelled';
    RETURN v;
END
$$;

CREATE PROCEDURE hr.give_raise(p_department integer, p_amount numeric)
    LANGUAGE plpgsql
AS $$
BEGIN
    IF p_amount <= 0 THEN
        RAISE EXCEPTION 'a raise must be positive, got %', p_amount;
    END IF;
    UPDATE hr.employees
       SET salary = salary + p_amount
     WHERE department_id = p_department
       AND NOT on_leave;
END
$$;

------------------------------------------------------------------------------
-- Tables
------------------------------------------------------------------------------

CREATE TABLE shop.customers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    external_id uuid NOT NULL UNIQUE,
    email       shop.email NOT NULL,
    full_name   text NOT NULL,
    address     shop.address,
    tags        text[] NOT NULL DEFAULT '{}',
    is_active   boolean NOT NULL DEFAULT true,
    credit      money NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz,
    CONSTRAINT customers_email_key UNIQUE (email)
);

CREATE TABLE shop.products (
    id        integer PRIMARY KEY,
    sku       text NOT NULL UNIQUE CHECK (sku ~ '^SKU-[0-9]{6}$'),
    name      text NOT NULL,
    price     numeric(10,2) NOT NULL CHECK (price >= 0),
    attrs     jsonb NOT NULL DEFAULT '{}',
    thumbnail bytea,
    in_stock  boolean NOT NULL DEFAULT true
);

CREATE TABLE shop.orders (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    order_no    bigint NOT NULL DEFAULT nextval('shop.order_no_seq') UNIQUE,
    customer_id bigint NOT NULL,
    status      shop.order_status NOT NULL DEFAULT 'pending',
    ordered_on  date NOT NULL DEFAULT current_date,
    ordered_at  timestamptz NOT NULL DEFAULT now(),
    total       numeric(12,2) NOT NULL CHECK (total >= 0),
    discount    numeric(12,2) NOT NULL DEFAULT 0,
    net_total   numeric(12,2) GENERATED ALWAYS AS (total - discount) STORED,
    ship_within interval NOT NULL DEFAULT interval '3 days',
    notes       text,
    updated_at  timestamptz,
    CONSTRAINT orders_discount_check CHECK (discount >= 0 AND discount <= total)
);

CREATE TABLE shop.order_items (
    order_id   bigint NOT NULL,
    line_no    smallint NOT NULL CHECK (line_no BETWEEN 1 AND 10),
    product_id integer NOT NULL,
    quantity   shop.positive_qty,
    unit_price numeric(10,2) NOT NULL CHECK (unit_price >= 0),
    PRIMARY KEY (order_id, line_no)
);

-- TOAST: body is 3.2-10 kB of hex md5 digests, which pglz cannot shrink by
-- the 25% it requires, so it is stored out of line uncompressed.
CREATE TABLE shop.documents (
    id          integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    customer_id bigint NOT NULL,
    title       text NOT NULL,
    revision    integer NOT NULL DEFAULT 1 CHECK (revision > 0),
    body        text NOT NULL,
    updated_at  timestamptz
);

-- No primary key, no unique index: REPLICA IDENTITY FULL.
CREATE TABLE ops.events (
    seq       bigint NOT NULL DEFAULT nextval('ops.event_seq'),
    logged_at timestamptz NOT NULL DEFAULT now(),
    host      text NOT NULL,
    level     text NOT NULL CHECK (level IN ('debug', 'info', 'warning', 'error')),
    message   text NOT NULL,
    payload   jsonb
);
ALTER TABLE ops.events REPLICA IDENTITY FULL;

-- Range-partitioned by month, plus a default partition.
CREATE TABLE ops.metrics (
    id          bigserial,
    recorded_at timestamptz NOT NULL,
    host        text NOT NULL,
    name        text NOT NULL,
    value       double precision NOT NULL,
    PRIMARY KEY (id, recorded_at)
) PARTITION BY RANGE (recorded_at);
CREATE TABLE ops.metrics_2024_01 PARTITION OF ops.metrics
    FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2024-02-01 00:00:00+00');
CREATE TABLE ops.metrics_2024_02 PARTITION OF ops.metrics
    FOR VALUES FROM ('2024-02-01 00:00:00+00') TO ('2024-03-01 00:00:00+00');
CREATE TABLE ops.metrics_2024_03 PARTITION OF ops.metrics
    FOR VALUES FROM ('2024-03-01 00:00:00+00') TO ('2024-04-01 00:00:00+00');
CREATE TABLE ops.metrics_2024_04 PARTITION OF ops.metrics
    FOR VALUES FROM ('2024-04-01 00:00:00+00') TO ('2024-05-01 00:00:00+00');
CREATE TABLE ops.metrics_2024_05 PARTITION OF ops.metrics
    FOR VALUES FROM ('2024-05-01 00:00:00+00') TO ('2024-06-01 00:00:00+00');
CREATE TABLE ops.metrics_2024_06 PARTITION OF ops.metrics
    FOR VALUES FROM ('2024-06-01 00:00:00+00') TO ('2024-07-01 00:00:00+00');
CREATE TABLE ops.metrics_default PARTITION OF ops.metrics DEFAULT;

-- Filled by the rule on shop.products.
CREATE TABLE ops.price_history (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id integer NOT NULL,
    old_price  numeric(10,2),
    new_price  numeric(10,2),
    changed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE hr.departments (
    id        integer PRIMARY KEY,
    name      text NOT NULL UNIQUE,
    budget    numeric(14,2) NOT NULL CHECK (budget > 0),
    parent_id integer REFERENCES hr.departments (id)
);

CREATE TABLE hr.employees (
    id            integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    department_id integer NOT NULL,
    manager_id    integer,
    full_name     text NOT NULL,
    email         shop.email NOT NULL UNIQUE,
    hired_on      date NOT NULL,
    salary        numeric(12,2) NOT NULL CHECK (salary > 0),
    shift         hr.timerange NOT NULL,
    on_leave      boolean NOT NULL DEFAULT false
);

CREATE TABLE hr.room_bookings (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    employee_id integer NOT NULL,
    during      tstzrange NOT NULL,
    CONSTRAINT room_bookings_no_overlap EXCLUDE USING gist (during WITH &&)
);

COMMENT ON TABLE shop.orders IS 'One row per customer order; lines are in shop.order_items';
COMMENT ON COLUMN shop.orders.net_total IS 'total - discount, computed by PostgreSQL';
COMMENT ON COLUMN shop.documents.body IS '3-10 kB, stored out of line (TOAST)';

------------------------------------------------------------------------------
-- Data (deterministic: everything derives from md5 of the row number)
------------------------------------------------------------------------------

INSERT INTO shop.customers
    (id, external_id, email, full_name, address, tags, is_active, credit, created_at)
OVERRIDING SYSTEM VALUE
SELECT i,
       md5('customer-' || i)::uuid,
       'user' || i || '@example.' || (ARRAY['com', 'org', 'net'])[1 + i % 3],
       (ARRAY['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara', 'Donald', 'Frances', 'Ken',
              'Margaret', 'Dennis', 'Radia', 'John'])[1 + h % 12]
         || ' ' ||
       (ARRAY['Lovelace', 'Hopper', 'Turing', 'Dijkstra', 'Liskov', 'Knuth', 'Allen',
              'Thompson', 'Hamilton', 'Ritchie', 'Perlman', 'Backus'])[1 + (h / 12) % 12],
       ROW((h / 144) % 999 + 1 || ' ' ||
             (ARRAY['Main St', 'High St', 'Station Rd', 'Park Ave', 'Mill Lane'])[1 + (h / 7) % 5],
           (ARRAY['Lisbon', 'Berlin', 'Paris', 'Madrid', 'Rome', 'Vienna', 'Oslo',
                  'Dublin', 'Prague', 'Warsaw'])[1 + (h / 11) % 10],
           lpad(((h / 13) % 100000)::text, 5, '0'),
           (ARRAY['PT', 'DE', 'FR', 'ES', 'IT', 'AT', 'NO', 'IE', 'CZ', 'PL'])[1 + (h / 11) % 10]
       )::shop.address,
       (ARRAY['vip', 'newsletter', 'wholesale', 'b2b', 'returns'])[1 + h % 5 : 1 + h % 5 + (h / 5) % 3],
       h % 10 <> 0,
       ((h % 100000) / 100.0)::numeric::money,
       timestamptz '2022-01-01 00:00:00+00' + (h % (730 * 86400)) * interval '1 second'
  FROM generate_series(1, 50000) AS i,
       LATERAL (SELECT ops.hash_int('c' || i)) AS x(h);
SELECT setval(pg_get_serial_sequence('shop.customers', 'id'), 50000);

INSERT INTO shop.products (id, sku, name, price, attrs, thumbnail, in_stock)
SELECT i,
       'SKU-' || lpad(i::text, 6, '0'),
       (ARRAY['Red', 'Blue', 'Green', 'Black', 'White', 'Silver', 'Golden'])[1 + h % 7]
         || ' ' ||
       (ARRAY['Widget', 'Gadget', 'Sprocket', 'Gizmo', 'Doohickey', 'Flange', 'Bracket'])[1 + (h / 7) % 7]
         || ' ' || i,
       1 + (h % 50000) / 100.0,
       jsonb_build_object(
           'weight_g', (h / 49) % 5000,
           'fragile', (h / 3) % 4 = 0,
           'dims', jsonb_build_array((h / 5) % 100, (h / 7) % 100, (h / 9) % 100),
           'supplier', jsonb_build_object('id', (h / 11) % 50, 'country', 'PT')),
       decode(md5('p' || i) || md5('q' || i), 'hex'),
       h % 7 <> 0
  FROM generate_series(1, 2000) AS i,
       LATERAL (SELECT ops.hash_int('p' || i)) AS x(h);

INSERT INTO shop.orders
    (id, order_no, customer_id, status, ordered_on, ordered_at, total, discount, ship_within, notes)
SELECT i,
       1000000 + i,
       1 + h % 50000,
       (CASE WHEN i > 199000 THEN 'pending'
             WHEN (h / 50000) % 20 = 0 THEN 'cancelled'
             WHEN i > 196000 THEN 'paid'
             WHEN i > 190000 THEN 'shipped'
             ELSE 'delivered' END)::shop.order_status,
       (ts AT TIME ZONE 'UTC')::date,
       ts,
       total,
       CASE WHEN (h / 7) % 5 = 0 THEN round(total * 0.1, 2) ELSE 0 END,
       make_interval(days => 1 + ((h / 3) % 7)::int, hours => ((h / 11) % 24)::int),
       CASE WHEN (h / 13) % 10 = 0 THEN 'gift wrap, note #' || i END
  FROM generate_series(1, 200000) AS i,
       LATERAL (SELECT ops.hash_int('o' || i)) AS x(h),
       LATERAL (SELECT timestamptz '2023-01-01 00:00:00+00' + i * interval '157 seconds',
                       ((h / 1000) % 100000) / 100.0) AS y(ts, total);
SELECT setval(pg_get_serial_sequence('shop.orders', 'id'), 200000);
SELECT setval('shop.order_no_seq', 1200000);

INSERT INTO shop.order_items (order_id, line_no, product_id, quantity, unit_price)
SELECT o,
       l,
       1 + h % 2000,
       1 + ((h / 2000) % 5)::int,
       1 + ((h / 10000) % 50000) / 100.0
  FROM generate_series(1, 200000) AS o,
       LATERAL generate_series(1, 1 + (ops.hash_int('ol' || o) % 3)::int) AS l,
       LATERAL (SELECT ops.hash_int('oi' || o || '-' || l)) AS x(h);

INSERT INTO shop.documents (id, customer_id, title, revision, body)
SELECT i,
       1 + h % 50000,
       'Contract #' || i,
       1 + (h / 50000) % 3,
       (SELECT string_agg(md5(i || '-' || j), '' ORDER BY j)
          FROM generate_series(1, 100 + (h % 213)::int) AS j)
  FROM generate_series(1, 3000) AS i,
       LATERAL (SELECT ops.hash_int('d' || i)) AS x(h);
SELECT setval(pg_get_serial_sequence('shop.documents', 'id'), 3000);

INSERT INTO ops.events (seq, logged_at, host, level, message, payload)
SELECT i,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '61 seconds',
       'host-' || h % 16,
       (ARRAY['debug', 'info', 'info', 'info', 'warning', 'error'])[1 + (h / 16) % 6],
       'event ' || i || ': ' || left(md5('e' || i), 12),
       CASE WHEN (h / 96) % 3 = 0 THEN NULL
            ELSE jsonb_build_object('pid', (h / 7) % 32768, 'ms', (h / 3) % 1000) END
  FROM generate_series(1, 20000) AS i,
       LATERAL (SELECT ops.hash_int('e' || i)) AS x(h);
-- 100 byte-identical duplicates: a keyless table may hold them.
INSERT INTO ops.events SELECT * FROM ops.events WHERE seq % 200 = 0;
SELECT setval('ops.event_seq', 20000);

-- 160 s apart from 2024-01-01: the last ~1000 rows fall in July and land in
-- the default partition.
INSERT INTO ops.metrics (id, recorded_at, host, name, value)
SELECT i,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '160 seconds',
       'host-' || h % 16,
       (ARRAY['cpu', 'mem', 'disk', 'net_in', 'net_out'])[1 + (h / 16) % 5],
       ((h / 80) % 100000) / 100.0 - 500
  FROM generate_series(1, 100000) AS i,
       LATERAL (SELECT ops.hash_int('m' || i)) AS x(h);
SELECT setval(pg_get_serial_sequence('ops.metrics', 'id'), 100000);

INSERT INTO hr.departments (id, name, budget, parent_id)
SELECT i,
       (ARRAY['Engineering', 'Sales', 'Support', 'Finance', 'Legal'])[1 + (i - 1) % 5]
         || CASE WHEN i > 5 THEN ' ' || (i - 1) / 5 ELSE '' END,
       100000 + (ops.hash_int('dep' || i) % 900000),
       CASE WHEN i > 5 THEN 1 + (i - 1) % 5 END
  FROM generate_series(1, 20) AS i;

-- Employees 1..20 head departments 1..20; everyone else reports to the head.
INSERT INTO hr.employees
    (id, department_id, manager_id, full_name, email, hired_on, salary, shift, on_leave)
OVERRIDING SYSTEM VALUE
SELECT i,
       d,
       CASE WHEN i > 20 THEN d END,
       'Employee ' || i,
       'employee' || i || '@corp.example.com',
       date '2010-01-01' + (h % 5000)::int,
       30000 + (h / 5000) % 90000,
       hr.timerange(s, s + interval '8 hours'),
       (h / 7) % 25 = 0
  FROM generate_series(1, 5000) AS i,
       LATERAL (SELECT 1 + (i - 1) % 20, ops.hash_int('emp' || i)) AS x(d, h),
       LATERAL (SELECT time '06:00' + ((h / 11) % 9) * interval '1 hour') AS y(s);
SELECT setval(pg_get_serial_sequence('hr.employees', 'id'), 5000);

INSERT INTO hr.room_bookings (id, employee_id, during)
OVERRIDING SYSTEM VALUE
SELECT i,
       1 + ops.hash_int('rb' || i) % 5000,
       tstzrange(timestamptz '2024-03-01 08:00:00+00' + i * interval '1 hour',
                 timestamptz '2024-03-01 08:50:00+00' + i * interval '1 hour')
  FROM generate_series(1, 200) AS i;
SELECT setval(pg_get_serial_sequence('hr.room_bookings', 'id'), 200);

------------------------------------------------------------------------------
-- Foreign keys and secondary indexes (after the data, as a loader would)
------------------------------------------------------------------------------

ALTER TABLE shop.orders
    ADD CONSTRAINT orders_customer_id_fkey
    FOREIGN KEY (customer_id) REFERENCES shop.customers (id);
ALTER TABLE shop.order_items
    ADD CONSTRAINT order_items_order_id_fkey
    FOREIGN KEY (order_id) REFERENCES shop.orders (id) ON DELETE CASCADE;
ALTER TABLE shop.order_items
    ADD CONSTRAINT order_items_product_id_fkey
    FOREIGN KEY (product_id) REFERENCES shop.products (id);
ALTER TABLE shop.documents
    ADD CONSTRAINT documents_customer_id_fkey
    FOREIGN KEY (customer_id) REFERENCES shop.customers (id);
ALTER TABLE ops.price_history
    ADD CONSTRAINT price_history_product_id_fkey
    FOREIGN KEY (product_id) REFERENCES shop.products (id);
ALTER TABLE hr.employees
    ADD CONSTRAINT employees_department_id_fkey
    FOREIGN KEY (department_id) REFERENCES hr.departments (id);
ALTER TABLE hr.employees
    ADD CONSTRAINT employees_manager_id_fkey
    FOREIGN KEY (manager_id) REFERENCES hr.employees (id) ON DELETE SET NULL;
ALTER TABLE hr.room_bookings
    ADD CONSTRAINT room_bookings_employee_id_fkey
    FOREIGN KEY (employee_id) REFERENCES hr.employees (id);

-- btree
CREATE INDEX orders_customer_id_idx ON shop.orders (customer_id);
CREATE INDEX order_items_product_id_idx ON shop.order_items (product_id);
CREATE INDEX documents_customer_id_idx ON shop.documents (customer_id);
CREATE INDEX employees_department_id_idx ON hr.employees (department_id);
CREATE INDEX events_seq_idx ON ops.events (seq);
-- partial
CREATE INDEX orders_pending_idx ON shop.orders (ordered_at) WHERE status = 'pending';
-- expression
CREATE INDEX customers_city_idx ON shop.customers (((address).city));
CREATE INDEX customers_lower_name_idx ON shop.customers (lower(full_name));
-- extension operator classes / other access methods
CREATE INDEX products_name_trgm_idx ON shop.products USING gin (name gin_trgm_ops);
CREATE INDEX products_attrs_idx ON shop.products USING gin (attrs jsonb_path_ops);
-- on the partitioned table (cascades to every partition)
CREATE INDEX metrics_host_recorded_at_idx ON ops.metrics (host, recorded_at);

------------------------------------------------------------------------------
-- Triggers and rule
------------------------------------------------------------------------------

CREATE TRIGGER customers_touch_updated_at
    BEFORE UPDATE ON shop.customers
    FOR EACH ROW EXECUTE FUNCTION shop.touch_updated_at();
CREATE TRIGGER orders_touch_updated_at
    BEFORE UPDATE ON shop.orders
    FOR EACH ROW EXECUTE FUNCTION shop.touch_updated_at();
-- (A whole-row WHEN is not allowed on shop.orders: it has a generated column.)
CREATE TRIGGER documents_touch_updated_at
    BEFORE UPDATE ON shop.documents
    FOR EACH ROW
    WHEN (OLD.* IS DISTINCT FROM NEW.*)
    EXECUTE FUNCTION shop.touch_updated_at();

CREATE RULE products_price_history AS
    ON UPDATE TO shop.products
    WHERE NEW.price IS DISTINCT FROM OLD.price
    DO ALSO
    INSERT INTO ops.price_history (product_id, old_price, new_price)
    VALUES (NEW.id, OLD.price, NEW.price);

------------------------------------------------------------------------------
-- Views and materialized view
------------------------------------------------------------------------------

CREATE VIEW shop.customer_order_stats AS
SELECT c.id AS customer_id,
       c.email,
       count(o.id) AS orders,
       coalesce(sum(o.net_total), 0) AS revenue,
       max(o.ordered_at) AS last_order_at
  FROM shop.customers c
  LEFT JOIN shop.orders o ON o.customer_id = c.id
 GROUP BY c.id, c.email;

-- Uses the custom operator.
CREATE VIEW shop.discounted_orders AS
SELECT id, order_no, total, discount, discount OPERATOR(shop.%%) total AS discount_pct
  FROM shop.orders
 WHERE discount > 0;

CREATE VIEW shop.active_customers AS
SELECT id, email, full_name, address, tags
  FROM shop.customers
 WHERE is_active
  WITH CHECK OPTION;

CREATE VIEW hr.department_headcount AS
SELECT d.id, d.name, count(e.id) AS headcount, sum(e.salary) AS payroll
  FROM hr.departments d
  LEFT JOIN hr.employees e ON e.department_id = d.id
 GROUP BY d.id, d.name;

-- Uses the custom aggregate.
CREATE VIEW ops.metric_peaks AS
SELECT host, name, ops.absmax(value) AS peak, count(*) AS samples
  FROM ops.metrics
 GROUP BY host, name;

CREATE MATERIALIZED VIEW shop.daily_sales AS
SELECT ordered_on, count(*) AS orders, sum(net_total) AS revenue
  FROM shop.orders
 WHERE status <> 'cancelled'
 GROUP BY ordered_on;
CREATE UNIQUE INDEX daily_sales_ordered_on_idx ON shop.daily_sales (ordered_on);

CREATE PROCEDURE ops.refresh_reports()
    LANGUAGE plpgsql
AS $$
BEGIN
    REFRESH MATERIALIZED VIEW CONCURRENTLY shop.daily_sales;
END
$$;

ANALYZE;
