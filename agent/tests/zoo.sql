-- The "zoo": one schema holding every kind of object and value that
-- PostgreSQL accepts and real applications (and PostgreSQL's own regression
-- tests) use, for agent/tests/zoo.rs. It must load into a UTF-8 database
-- and into a LATIN1 one alike: every non-ASCII character below exists in
-- LATIN1 (é, ß, ü, ö, ä), and nothing depends on the database's locale.
--
-- Rows are few (a few hundred per table); zoo.rs changes them while the
-- migration runs (see its `Load`), so keep the names it uses.

SET client_encoding = 'UTF8';
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS btree_gist;
COMMENT ON EXTENSION btree_gist IS 'zoo: exclusion constraints on scalars';

CREATE SCHEMA zoo;
COMMENT ON SCHEMA zoo IS 'zoo: every kind of object';
SET search_path = zoo, public;

-- ---------------------------------------------------------------------------
-- Types
-- ---------------------------------------------------------------------------

CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'fröhlich');
ALTER TYPE mood ADD VALUE 'meh' BEFORE 'ok';
COMMENT ON TYPE mood IS 'zoo: an enum, one label added later (odd sort order)';

CREATE TYPE pair AS (a int, b text);
COMMENT ON TYPE pair IS 'zoo: a composite type';
COMMENT ON COLUMN pair.b IS 'zoo: a column of a composite type';

CREATE DOMAIN posint AS int CONSTRAINT posint_check CHECK (VALUE > 0);
COMMENT ON DOMAIN posint IS 'zoo: a domain with a check';
COMMENT ON CONSTRAINT posint_check ON DOMAIN posint IS 'zoo: a domain constraint';
CREATE DOMAIN email AS text COLLATE "C" NOT NULL DEFAULT 'nobody@example.com'
    CONSTRAINT email_check CHECK (VALUE LIKE '%@%');

CREATE TYPE floatrange AS RANGE (subtype = float8, subtype_diff = float8mi);
COMMENT ON TYPE floatrange IS 'zoo: a range type (and its multirange)';

-- A base type with text I/O only (no send/receive), the regression-test way.
CREATE TYPE t_noio;
CREATE FUNCTION t_noio_in(cstring) RETURNS t_noio LANGUAGE internal IMMUTABLE STRICT AS 'textin';
CREATE FUNCTION t_noio_out(t_noio) RETURNS cstring LANGUAGE internal IMMUTABLE STRICT AS 'textout';
CREATE TYPE t_noio (INPUT = t_noio_in, OUTPUT = t_noio_out, LIKE = text);
COMMENT ON TYPE t_noio IS 'zoo: a base type without binary I/O';
CREATE DOMAIN t_noio_d AS t_noio;
CREATE CAST (t_noio AS text) WITHOUT FUNCTION;
COMMENT ON CAST (t_noio AS text) IS 'zoo: a cast';

CREATE COLLATION c_copy FROM "C";
COMMENT ON COLLATION c_copy IS 'zoo: a collation';

CREATE CONVERSION latin1_to_utf8_zoo FOR 'LATIN1' TO 'UTF8' FROM iso8859_1_to_utf8;
COMMENT ON CONVERSION latin1_to_utf8_zoo IS 'zoo: a conversion';

-- Text search objects, made from the built-in C functions as the
-- regression tests do.
CREATE TEXT SEARCH PARSER zoo_parser (START = prsd_start, GETTOKEN = prsd_nexttoken, END = prsd_end,
    LEXTYPES = prsd_lextype, HEADLINE = prsd_headline);
COMMENT ON TEXT SEARCH PARSER zoo_parser IS 'zoo: a text search parser';
CREATE TEXT SEARCH TEMPLATE zoo_template (INIT = dsimple_init, LEXIZE = dsimple_lexize);
COMMENT ON TEXT SEARCH TEMPLATE zoo_template IS 'zoo: a text search template';
CREATE TEXT SEARCH DICTIONARY zoo_dict (TEMPLATE = zoo_template, STOPWORDS = english);
COMMENT ON TEXT SEARCH DICTIONARY zoo_dict IS 'zoo: a text search dictionary';
CREATE TEXT SEARCH CONFIGURATION zoo_ts (PARSER = zoo_parser);
ALTER TEXT SEARCH CONFIGURATION zoo_ts ADD MAPPING FOR word, asciiword WITH zoo_dict;
COMMENT ON TEXT SEARCH CONFIGURATION zoo_ts IS 'zoo: a text search configuration';

CREATE ACCESS METHOD zoo_heap TYPE TABLE HANDLER heap_tableam_handler;
COMMENT ON ACCESS METHOD zoo_heap IS 'zoo: an access method';

CREATE FOREIGN DATA WRAPPER zoo_fdw;
COMMENT ON FOREIGN DATA WRAPPER zoo_fdw IS 'zoo: a foreign-data wrapper';
CREATE SERVER zoo_server FOREIGN DATA WRAPPER zoo_fdw OPTIONS (host 'nowhere');
COMMENT ON SERVER zoo_server IS 'zoo: a foreign server';
CREATE FOREIGN TABLE remote_thing (id int, name text) SERVER zoo_server OPTIONS (table_name 'thing');
COMMENT ON FOREIGN TABLE remote_thing IS 'zoo: a foreign table (no data of its own)';
COMMENT ON COLUMN remote_thing.name IS 'zoo: a column of a foreign table';

-- Operators, operator class and family, aggregate.
CREATE FUNCTION pair_eq(pair, pair) RETURNS bool LANGUAGE sql IMMUTABLE STRICT AS 'SELECT $1.a = $2.a';
CREATE OPERATOR === (LEFTARG = pair, RIGHTARG = pair, FUNCTION = pair_eq, COMMUTATOR = ===);
COMMENT ON OPERATOR === (pair, pair) IS 'zoo: an operator';
CREATE OPERATOR FAMILY int4_plain_fam USING btree;
COMMENT ON OPERATOR FAMILY int4_plain_fam USING btree IS 'zoo: an operator family';
CREATE OPERATOR CLASS int4_plain_ops FOR TYPE int4 USING btree FAMILY int4_plain_fam AS
    OPERATOR 1 <, OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >, FUNCTION 1 btint4cmp(int4, int4);
COMMENT ON OPERATOR CLASS int4_plain_ops USING btree IS 'zoo: an operator class';
CREATE AGGREGATE text_concat(text) (SFUNC = textcat, STYPE = text, INITCOND = '');
COMMENT ON AGGREGATE text_concat(text) IS 'zoo: an aggregate';

CREATE SEQUENCE ticket_seq START 100 INCREMENT 3 CACHE 1;
COMMENT ON SEQUENCE ticket_seq IS 'zoo: a sequence';

-- ---------------------------------------------------------------------------
-- Every built-in type family, one column each
-- ---------------------------------------------------------------------------

CREATE TABLE types (
    id int PRIMARY KEY,
    n numeric, n_fixed numeric(12, 4), i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, m money,
    c char(10), vc varchar(20), t text, bp bpchar, ch "char", nm name,
    b bytea, bo bool,
    d date, tm time, ttz timetz, ts timestamp, tstz timestamptz, iv interval, ts3 timestamp(3),
    u uuid, ip inet, net cidr, mac macaddr, mac8 macaddr8,
    bt bit(8), vb varbit(16),
    js json, jb jsonb, jp jsonpath, x xml,
    pt point, ln line, ls lseg, bx box, pa path, pg polygon, ci circle,
    tv tsvector, tq tsquery,
    r4 int4range, r8 int8range, rn numrange, rts tsrange, rtz tstzrange, rd daterange, rf floatrange,
    mr int4multirange, mrd datemultirange, mrf floatmultirange,
    ia int[], ta text[], ma int[][], lb int[], na numeric[], ja jsonb[],
    e mood, ea mood[], cp pair, cpa pair[], dm posint, em email,
    lsn pg_lsn, o oid, acl aclitem, acls aclitem[], snap txid_snapshot, psnap pg_snapshot, x8 xid8, tid_ tid,
    noio t_noio, noio_d t_noio_d, noio_a t_noio[]
);
COMMENT ON TABLE types IS 'zoo: one column per built-in type family';
COMMENT ON COLUMN types.n IS 'zoo: numeric with NaN and ±Infinity';

-- One row of `types` for each i: special values on some rows, NULLs on others.
CREATE FUNCTION type_row(i int) RETURNS types LANGUAGE sql STABLE AS $$
SELECT i,
    CASE i % 9 WHEN 0 THEN 'NaN' WHEN 1 THEN 'Infinity' WHEN 2 THEN '-Infinity' WHEN 3 THEN NULL
        WHEN 4 THEN 0.000000000000000000000000000001 ELSE (i * 12345.678901234567890123::numeric) ^ 3 END,
    (i * 1.2345)::numeric(12, 4),
    CASE i % 5 WHEN 0 THEN -32768 WHEN 1 THEN 32767 ELSE i END::int2,
    CASE i % 5 WHEN 0 THEN -2147483648 WHEN 1 THEN 2147483647 ELSE i * 1000 END,
    CASE i % 5 WHEN 0 THEN -9223372036854775808 WHEN 1 THEN 9223372036854775807 ELSE i::int8 * 1000000007 END,
    CASE i % 7 WHEN 0 THEN 'NaN' WHEN 1 THEN 'Infinity' WHEN 2 THEN '-Infinity' WHEN 3 THEN '-0' WHEN 4 THEN '1.17549435e-38'
        ELSE (i / 7.0)::text END::float4,
    CASE i % 7 WHEN 0 THEN 'NaN' WHEN 1 THEN '-Infinity' WHEN 2 THEN 'Infinity' WHEN 3 THEN '-0' WHEN 4 THEN '2.2250738585072014e-308'
        ELSE (i / 3.0)::text END::float8,
    (i * 1.25)::numeric::money,
    'c' || i, 'vc ' || i, CASE WHEN i % 10 = 0 THEN NULL ELSE 'text é ß ü ' || repeat('x', i % 40) END, 'bp ' || i || '  ',
    chr(65 + i % 26)::"char", ('name_' || i)::name,
    CASE WHEN i % 11 = 0 THEN ''::bytea ELSE '\x00ff'::bytea || decode(md5(i::text), 'hex') || '\x00'::bytea END, i % 2 = 0,
    CASE i % 8 WHEN 0 THEN 'infinity' WHEN 1 THEN '-infinity' ELSE date '2000-01-01' + i END,
    time '00:00:00.000001' + i * interval '1 minute 0.5 second',
    ('12:34:56.789+' || lpad((i % 14)::text, 2, '0') || ':30')::timetz,
    CASE i % 8 WHEN 0 THEN 'infinity' WHEN 1 THEN '-infinity' ELSE timestamp '1999-12-31 23:59:59.999999' + i * interval '1 day 1 hour' END,
    CASE i % 8 WHEN 0 THEN '-infinity' WHEN 1 THEN 'infinity' ELSE timestamptz '2024-02-29 12:00:00+05:30' + i * interval '1 second' END,
    CASE i % 3 WHEN 0 THEN interval '-1 year -2 months +3 days -04:05:06.000007' ELSE i * interval '1 month 1 day 1 microsecond' END,
    timestamp '2020-01-01 00:00:00.123' + i * interval '1 ms',
    md5(i::text)::uuid,
    CASE i % 2 WHEN 0 THEN ('10.0.' || i % 256 || '.1/24')::inet ELSE ('2001:db8::' || to_hex(i))::inet END,
    CASE i % 2 WHEN 0 THEN ('10.' || i % 256 || '.0.0/16')::cidr ELSE '2001:db8::/32'::cidr END,
    ('08:00:2b:01:02:' || lpad(to_hex(i % 256), 2, '0'))::macaddr,
    ('08:00:2b:01:02:03:04:' || lpad(to_hex(i % 256), 2, '0'))::macaddr8,
    (i % 256)::bit(8), (i % 65536)::bit(16)::varbit(16),
    ('{"k": ' || i || ',  "k": "dup key and spacing kept", "é": [1, 2.50, null]}')::json,
    jsonb_build_object('i', i, 'n', 1.10, 'nested', jsonb_build_object('ß', ARRAY[i, i + 1]), 'null', NULL),
    '$.a[*] ? (@ > 1)'::jsonpath,
    CASE WHEN i % 4 = 0 THEN NULL ELSE ('<r i="' || i || '"><é>ü</é><!-- c --></r>')::xml END,
    point(i, -i / 3.0), line(point(0, 0), point(1, i)), lseg(point(0, 0), point(i, i)),
    box(point(i, i), point(i + 1, i + 2)), ('[(0,0),(' || i || ',1),(2,2)]')::path,
    ('((0,0),(' || i || ',0),(0,1))')::polygon, circle(point(i, 0), 1.5),
    to_tsvector('english', 'The quick brown foxes ' || i || ' jumped über'), to_tsquery('english', 'fox & !dog | jump:*'),
    int4range(i, i + 10), int8range(NULL, i, '(]'), numrange(i / 3.0, NULL), tsrange('2020-01-01', timestamp '2020-01-01' + i * interval '1 hour', '[]'),
    CASE WHEN i % 5 = 0 THEN 'empty'::tstzrange ELSE tstzrange('2020-01-01 00:00+00', 'infinity') END,
    daterange('2020-01-01', NULL), floatrange(i, i + 0.5),
    int4multirange(int4range(1, 3), int4range(i + 5, i + 9)), datemultirange(), floatmultirange(floatrange(-i, 0)),
    ARRAY[i, NULL, -i], ARRAY['a,b', NULL, 'NULL', '"q"', 'ß'], ARRAY[[i, 2], [3, NULL]], '[0:1]={7,8}'::int[],
    ARRAY['NaN'::numeric, 1.500, NULL], ARRAY['{"a": 1}'::jsonb, NULL],
    (enum_range(NULL::mood))[1 + i % 5], enum_range(NULL::mood), ROW(i, 'p é ' || i)::pair,
    ARRAY[ROW(i, NULL)::pair, NULL, ROW(NULL, 'x,y"z')::pair], 1 + i % 1000, ('user' || i || '@example.com')::email,
    ('0/' || to_hex(i * 4096))::pg_lsn, (i * 7)::oid,
    makeaclitem('postgres'::regrole, 'postgres'::regrole, 'SELECT', i % 2 = 0),
    ARRAY[makeaclitem(0, 'postgres'::regrole, 'USAGE', false), makeaclitem('postgres'::regrole, 'postgres'::regrole, 'UPDATE', true)],
    (i * 10 || ':' || i * 10 + 5 || ':' || i * 10 + 1)::txid_snapshot, (i * 10 || ':' || i * 10 + 3 || ':')::pg_snapshot,
    (i::int8 * 4294967296 + 7)::text::xid8, ('(' || i || ',' || i % 7 || ')')::tid,
    ('noio ' || i || ' é')::t_noio, CASE WHEN i % 6 = 0 THEN NULL ELSE ('noio_d ' || i)::t_noio_d END,
    ARRAY[('a' || i)::t_noio, NULL]
$$;
COMMENT ON FUNCTION type_row(int) IS 'zoo: a function returning a row type';

INSERT INTO types SELECT (type_row(g)).* FROM generate_series(1, 300) g;

-- ---------------------------------------------------------------------------
-- Odd but legal tables
-- ---------------------------------------------------------------------------

-- Tables without columns, with rows.
CREATE TABLE nocols ();
ALTER TABLE nocols REPLICA IDENTITY FULL;
COMMENT ON TABLE nocols IS 'zoo: a table without columns';
INSERT INTO nocols SELECT FROM generate_series(1, 25);
INSERT INTO nocols DEFAULT VALUES;

-- A keyless table, located by every column (json, point and xml have no
-- equality operator; t_noio and aclitem have no binary I/O), with
-- duplicate rows and a TOASTed value.
CREATE TABLE keyless_log (at timestamptz, msg text, js json, pt point, x xml, noio t_noio, acl aclitem, big text);
ALTER TABLE keyless_log REPLICA IDENTITY FULL;
COMMENT ON TABLE keyless_log IS 'zoo: no key, REPLICA IDENTITY FULL';
INSERT INTO keyless_log
SELECT timestamptz '2024-01-01 00:00+00' + g * interval '1 minute', CASE WHEN g % 10 = 0 THEN 'dup' ELSE 'msg ' || g END,
       '{"a": [1, 2]}', point(g, g), '<a/>', 'noio', makeaclitem('postgres'::regrole, 'postgres'::regrole, 'INSERT', false),
       CASE WHEN g % 50 = 0 THEN repeat(md5(g::text), 400) END
FROM generate_series(1, 200) g;
INSERT INTO keyless_log SELECT * FROM keyless_log WHERE msg = 'dup';

-- REPLICA IDENTITY USING INDEX, no primary key.
CREATE TABLE ri_index (a int NOT NULL, b text NOT NULL, v text);
CREATE UNIQUE INDEX ri_index_ab ON ri_index (a, b);
ALTER TABLE ri_index REPLICA IDENTITY USING INDEX ri_index_ab;
COMMENT ON INDEX ri_index_ab IS 'zoo: the replica identity index';
INSERT INTO ri_index SELECT g, 'b' || g % 3, 'v' || g FROM generate_series(1, 200) g;

-- Inheritance: a child made first with its columns in another order and
-- attached with INHERIT, and a child with extra columns.
CREATE TABLE vehicle (id int PRIMARY KEY, name text NOT NULL, wheels int DEFAULT 4);
COMMENT ON TABLE vehicle IS 'zoo: an inheritance parent';
CREATE TABLE car (doors int, wheels int DEFAULT 4, id int NOT NULL, name text NOT NULL, plate text UNIQUE);
ALTER TABLE car INHERIT vehicle;
ALTER TABLE car ADD PRIMARY KEY (id);
CREATE TABLE truck (payload numeric(10, 2), axles int DEFAULT 2) INHERITS (vehicle);
ALTER TABLE truck ADD PRIMARY KEY (id);
CREATE TABLE trailer (hitch text) INHERITS (truck);
ALTER TABLE trailer ADD PRIMARY KEY (id);
INSERT INTO vehicle SELECT g, 'bike ' || g, 2 FROM generate_series(1, 50) g;
INSERT INTO car SELECT 1 + g % 5, 4, 1000 + g, 'car ' || g, 'PL-' || g FROM generate_series(1, 100) g;
INSERT INTO truck SELECT 2000 + g, 'truck ' || g, 6, g * 10.5, 2 + g % 3 FROM generate_series(1, 60) g;
INSERT INTO trailer SELECT 3000 + g, 'trailer ' || g, 8, g, 3, 'hitch ' || g FROM generate_series(1, 30) g;

-- Partitions three levels deep (range, list, hash), a partition made first
-- with its columns in another order and attached, a default partition,
-- and a foreign key to the partitioned table.
CREATE TABLE measure (id bigint NOT NULL, at date NOT NULL, region text NOT NULL, v numeric, note text,
    PRIMARY KEY (id, at, region)) PARTITION BY RANGE (at);
COMMENT ON TABLE measure IS 'zoo: partitioned by range, then list, then hash';
CREATE TABLE measure_2024 PARTITION OF measure FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY LIST (region);
CREATE TABLE measure_2024_eu PARTITION OF measure_2024 FOR VALUES IN ('eu', 'ch') PARTITION BY HASH (id);
CREATE TABLE measure_2024_eu_h0 PARTITION OF measure_2024_eu FOR VALUES WITH (MODULUS 3, REMAINDER 0);
CREATE TABLE measure_2024_eu_h1 PARTITION OF measure_2024_eu FOR VALUES WITH (MODULUS 3, REMAINDER 1);
CREATE TABLE measure_2024_eu_h2 PARTITION OF measure_2024_eu FOR VALUES WITH (MODULUS 3, REMAINDER 2);
CREATE TABLE measure_2024_us PARTITION OF measure_2024 FOR VALUES IN ('us');
CREATE TABLE measure_2024_rest PARTITION OF measure_2024 DEFAULT;
CREATE TABLE measure_old (note text, v numeric, region text NOT NULL, at date NOT NULL, id bigint NOT NULL);
ALTER TABLE measure ATTACH PARTITION measure_old FOR VALUES FROM (MINVALUE) TO ('2024-01-01');
CREATE TABLE measure_other PARTITION OF measure DEFAULT;
CREATE INDEX measure_region_v ON measure (region, v);
COMMENT ON INDEX measure_region_v IS 'zoo: a partitioned index';
INSERT INTO measure
SELECT g, date '2023-10-01' + g, (ARRAY['eu', 'ch', 'us', 'jp'])[1 + g % 4], g / 7.0, CASE WHEN g % 3 = 0 THEN 'é' END
FROM generate_series(1, 600) g;
CREATE TABLE measure_note (id int PRIMARY KEY, measure_id bigint, at date, region text, body text,
    CONSTRAINT measure_note_measure_fk FOREIGN KEY (measure_id, at, region) REFERENCES measure);
INSERT INTO measure_note SELECT g, g, date '2023-10-01' + g, (ARRAY['eu', 'ch', 'us', 'jp'])[1 + g % 4], 'note ' || g
FROM generate_series(1, 50) g;

-- Non-ASCII names and values.
CREATE TABLE "tablé" (id int PRIMARY KEY, "größe" text, "Straße" varchar(40) COLLATE "C", "naïve" char(12), zahl numeric);
COMMENT ON TABLE "tablé" IS 'zoo: Überschrift für die Tabelle';
COMMENT ON COLUMN "tablé"."größe" IS 'zoo: Größe in ü';
CREATE INDEX "tablé_größe_idx" ON "tablé" ("größe");
INSERT INTO "tablé" SELECT g, 'größe ' || g || ' é', 'Straße ' || g, 'naïve ' || g % 10, g * 1.5 FROM generate_series(1, 150) g;

-- A typed table, a table using another access method, an unlogged table
-- (no change of it reaches the WAL, so the load never changes it), a table
-- with a dropped column, storage parameters and column options.
CREATE TABLE pair_table OF pair (PRIMARY KEY (a), b WITH OPTIONS DEFAULT 'none');
INSERT INTO pair_table SELECT g, 'pair ' || g FROM generate_series(1, 40) g;
CREATE TABLE on_zoo_heap (id int PRIMARY KEY, v text) USING zoo_heap;
INSERT INTO on_zoo_heap SELECT g, 'v' || g FROM generate_series(1, 40) g;
CREATE UNLOGGED TABLE cache_entry (k text PRIMARY KEY, v jsonb);
INSERT INTO cache_entry SELECT 'k' || g, jsonb_build_object('g', g) FROM generate_series(1, 40) g;
CREATE TABLE docs (id int PRIMARY KEY, title text, gone int, body text COMPRESSION pglz, meta int DEFAULT 0)
    WITH (fillfactor = 70, autovacuum_enabled = false, toast.autovacuum_enabled = false);
ALTER TABLE docs DROP COLUMN gone;
ALTER TABLE docs ALTER COLUMN title SET STATISTICS 500;
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
ALTER TABLE docs ALTER COLUMN meta SET (n_distinct = -0.5);
INSERT INTO docs (id, title, body) SELECT g, 'doc ' || g, repeat('Dokument ' || g || ' é ', 400 + g) FROM generate_series(1, 60) g;
CREATE TABLE "Mixed Case" ("select" int PRIMARY KEY, "Group" text, "a""quote" text);
INSERT INTO "Mixed Case" SELECT g, 'g' || g, 'q"' || g FROM generate_series(1, 30) g;

-- Truncated and refilled by the load.
CREATE TABLE scratch (id int PRIMARY KEY, v text);
INSERT INTO scratch SELECT g, 's' || g FROM generate_series(1, 100) g;

-- ---------------------------------------------------------------------------
-- Constraints of every kind
-- ---------------------------------------------------------------------------

CREATE TABLE parent (id int PRIMARY KEY, code text NOT NULL, CONSTRAINT parent_code_key UNIQUE (code));
CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL, qty int CONSTRAINT child_qty_check CHECK (qty >= 0),
    CONSTRAINT child_parent_fk FOREIGN KEY (parent_id) REFERENCES parent (id) ON DELETE CASCADE ON UPDATE CASCADE);
COMMENT ON CONSTRAINT child_parent_fk ON child IS 'zoo: a comment on a foreign key';
COMMENT ON CONSTRAINT parent_pkey ON parent IS 'zoo: a comment on a primary key';
COMMENT ON CONSTRAINT parent_code_key ON parent IS 'zoo: a comment on a unique constraint';
COMMENT ON CONSTRAINT child_qty_check ON child IS 'zoo: a comment on a check constraint';
ALTER TABLE child ADD CONSTRAINT child_qty_small CHECK (qty < 1000000) NOT VALID;
COMMENT ON CONSTRAINT child_qty_small ON child IS 'zoo: a NOT VALID check';
INSERT INTO parent SELECT g, 'code' || g FROM generate_series(1, 200) g;
INSERT INTO child SELECT g, 1 + g % 200, g FROM generate_series(1, 600) g;

-- The key besides another unique column: a swap of two values in one
-- transaction is legal on the source.
CREATE TABLE uniq (id int PRIMARY KEY, u int NOT NULL UNIQUE, v text);
COMMENT ON TABLE uniq IS 'zoo: a unique column besides the key';
INSERT INTO uniq SELECT g, g, 'v' || g FROM generate_series(1, 300) g;
-- A unique expression index and a partial unique index (NULLS NOT DISTINCT too).
CREATE TABLE uniq_more (id int PRIMARY KEY, email text, slot int, active bool, k int);
CREATE UNIQUE INDEX uniq_more_lower ON uniq_more (lower(email));
CREATE UNIQUE INDEX uniq_more_active ON uniq_more (slot) WHERE active;
CREATE UNIQUE INDEX uniq_more_k ON uniq_more (k) NULLS NOT DISTINCT;
INSERT INTO uniq_more SELECT g, 'user' || g || '@example.com', g, true, CASE WHEN g = 1 THEN NULL ELSE g END FROM generate_series(1, 100) g;

-- Deferrable constraints, initially deferred: a unique one, a foreign key
-- cycle and a self-reference.
CREATE TABLE seats (id int PRIMARY KEY, seat int CONSTRAINT seats_seat_key UNIQUE DEFERRABLE INITIALLY DEFERRED);
INSERT INTO seats SELECT g, g FROM generate_series(1, 100) g;
CREATE TABLE node (id int PRIMARY KEY, up int CONSTRAINT node_up_fk REFERENCES node DEFERRABLE INITIALLY DEFERRED, edge_id int);
CREATE TABLE edge (id int PRIMARY KEY, from_node int NOT NULL CONSTRAINT edge_from_fk REFERENCES node DEFERRABLE INITIALLY DEFERRED);
ALTER TABLE node ADD CONSTRAINT node_edge_fk FOREIGN KEY (edge_id) REFERENCES edge DEFERRABLE INITIALLY DEFERRED;
BEGIN;
INSERT INTO node SELECT g, CASE WHEN g > 1 THEN g / 2 END, g FROM generate_series(1, 100) g;
INSERT INTO edge SELECT g, g FROM generate_series(1, 100) g;
COMMIT;

-- Exclusion constraints: btree_gist on a scalar, and a plain gist on boxes.
CREATE TABLE booking (id int PRIMARY KEY, room int NOT NULL, during tsrange NOT NULL,
    CONSTRAINT booking_no_overlap EXCLUDE USING gist (room WITH =, during WITH &&));
COMMENT ON CONSTRAINT booking_no_overlap ON booking IS 'zoo: an exclusion constraint';
INSERT INTO booking SELECT g, g % 5, tsrange(timestamp '2024-01-01' + g * interval '1 day', timestamp '2024-01-01' + g * interval '1 day' + interval '2 hours')
FROM generate_series(1, 100) g;
CREATE TABLE shapes (id int PRIMARY KEY, b box, EXCLUDE USING gist (b WITH &&) WHERE (id > 0));
INSERT INTO shapes SELECT g, box(point(g * 10, 0), point(g * 10 + 5, 5)) FROM generate_series(1, 100) g;

-- ---------------------------------------------------------------------------
-- Generated columns, identity columns, defaults from sequences
-- ---------------------------------------------------------------------------

CREATE TABLE order_line (id serial PRIMARY KEY, qty int NOT NULL, price numeric(10, 2) NOT NULL,
    total numeric GENERATED ALWAYS AS (qty * price) STORED, label text GENERATED ALWAYS AS ('#' || id || ' × ' || qty) STORED);
COMMENT ON COLUMN order_line.total IS 'zoo: a generated column';
INSERT INTO order_line (qty, price) SELECT g % 10, g * 0.99 FROM generate_series(1, 300) g;

-- Identity BY DEFAULT as the key, and ALWAYS on a column that is not the key.
CREATE TABLE ticket (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    n bigint GENERATED ALWAYS AS IDENTITY (START WITH 1000 INCREMENT BY 10), v text, serial_no int DEFAULT nextval('ticket_seq'));
COMMENT ON COLUMN ticket.n IS 'zoo: identity ALWAYS, not the key';
INSERT INTO ticket (v) SELECT 'v' || g FROM generate_series(1, 200) g;
CREATE TABLE ticket_always (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
INSERT INTO ticket_always (v) SELECT 'v' || g FROM generate_series(1, 100) g;

-- ---------------------------------------------------------------------------
-- Row-level security, triggers
-- ---------------------------------------------------------------------------

CREATE TABLE account (id int PRIMARY KEY, owner name NOT NULL DEFAULT current_user, title text, slug text, balance numeric(12, 2));
ALTER TABLE account ENABLE ROW LEVEL SECURITY;
ALTER TABLE account FORCE ROW LEVEL SECURITY;
CREATE POLICY account_owner ON account USING (owner = current_user) WITH CHECK (balance >= 0);
CREATE POLICY account_read ON account AS PERMISSIVE FOR SELECT TO PUBLIC USING (true);
CREATE POLICY account_no_neg ON account AS RESTRICTIVE FOR UPDATE USING (balance > -1000);
COMMENT ON POLICY account_owner ON account IS 'zoo: a row-level security policy';

CREATE TABLE audit_log (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, account_id int, op text, title text);

-- An ordinary trigger: it fires on the source only; its rows reach the
-- destination through the stream.
CREATE FUNCTION account_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO zoo.audit_log (account_id, op, title) VALUES (NEW.id, TG_OP, NEW.title);
    RETURN NEW;
END $$;
COMMENT ON FUNCTION account_audit() IS 'zoo: a trigger function';
CREATE TRIGGER account_audit AFTER INSERT OR UPDATE ON account FOR EACH ROW EXECUTE FUNCTION account_audit();
COMMENT ON TRIGGER account_audit ON account IS 'zoo: an ordinary trigger';

-- An ENABLE ALWAYS trigger: it fires during apply on the destination too
-- (as with PostgreSQL's own logical replication), so it only derives a
-- column from the row, the same way on either side: no lower(), whose
-- result depends on the database's LC_CTYPE (C for the LATIN1 twin).
CREATE FUNCTION account_slug() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.slug := replace(NEW.title, ' ', '-');
    RETURN NEW;
END $$;
CREATE TRIGGER account_slug BEFORE INSERT OR UPDATE OF title ON account FOR EACH ROW EXECUTE FUNCTION account_slug();
ALTER TABLE account ENABLE ALWAYS TRIGGER account_slug;
COMMENT ON TRIGGER account_slug ON account IS 'zoo: an ENABLE ALWAYS trigger';
CREATE TRIGGER account_never BEFORE DELETE ON account FOR EACH ROW EXECUTE FUNCTION account_slug();
ALTER TABLE account DISABLE TRIGGER account_never;
CREATE CONSTRAINT TRIGGER account_check AFTER INSERT ON account DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION account_audit();
CREATE TRIGGER child_statement AFTER DELETE ON child REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION account_slug();
ALTER TABLE child DISABLE TRIGGER child_statement;
INSERT INTO account (id, title, balance) SELECT g, 'Account Nummer ' || g || ' für Jürgen', g * 10 FROM generate_series(1, 150) g;

-- ---------------------------------------------------------------------------
-- Views, rules, functions, procedures, statistics, indexes
-- ---------------------------------------------------------------------------

CREATE VIEW child_totals WITH (security_barrier) AS
    SELECT p.id, p.code, sum(c.qty) AS qty, text_concat(c.id::text) AS ids FROM parent p LEFT JOIN child c ON c.parent_id = p.id GROUP BY p.id;
COMMENT ON VIEW child_totals IS 'zoo: a view';
COMMENT ON COLUMN child_totals.qty IS 'zoo: a column of a view';
CREATE VIEW small_parent AS SELECT id, code FROM parent WHERE id < 100 WITH CASCADED CHECK OPTION;
CREATE VIEW parent_codes AS SELECT id, code FROM parent;
CREATE RULE parent_codes_insert AS ON INSERT TO parent_codes DO INSTEAD INSERT INTO parent VALUES (NEW.id, NEW.code);
COMMENT ON RULE parent_codes_insert ON parent_codes IS 'zoo: a rule';
CREATE RULE parent_deleted AS ON DELETE TO parent DO ALSO NOTIFY zoo_parent_deleted;
CREATE RECURSIVE VIEW node_depth (id, depth) AS SELECT id, 0 FROM node WHERE up IS NULL
    UNION ALL SELECT n.id, d.depth + 1 FROM node n JOIN node_depth d ON n.up = d.id;
-- Materialized views read tables the load leaves alone: their data is that
-- of the moment they were refreshed (on the destination: post-data).
CREATE MATERIALIZED VIEW pair_stats AS SELECT length(b) AS len, count(*) AS n, text_concat(b ORDER BY b) AS bs FROM pair_table GROUP BY 1;
CREATE UNIQUE INDEX pair_stats_len ON pair_stats (len);
COMMENT ON MATERIALIZED VIEW pair_stats IS 'zoo: a materialized view';
COMMENT ON COLUMN pair_stats.n IS 'zoo: a column of a materialized view';
CREATE MATERIALIZED VIEW pair_stats_total AS SELECT sum(n) AS n FROM pair_stats;
CREATE MATERIALIZED VIEW never_filled AS SELECT id FROM parent WITH NO DATA;

CREATE FUNCTION parent_count(min_id int DEFAULT 0) RETURNS bigint LANGUAGE sql STABLE PARALLEL SAFE
    BEGIN ATOMIC SELECT count(*) FROM zoo.parent WHERE id >= min_id; END;
COMMENT ON FUNCTION parent_count(int) IS 'zoo: a function with an SQL-standard body';
CREATE FUNCTION add_child(p int, q int, OUT new_id int) LANGUAGE plpgsql SECURITY DEFINER SET search_path = zoo, pg_temp AS $$
BEGIN
    INSERT INTO child VALUES ((SELECT coalesce(max(id), 0) + 1 FROM child), p, q) RETURNING id INTO new_id;
END $$;
CREATE PROCEDURE move_balance(src int, dst int, amount numeric) LANGUAGE plpgsql AS $$
BEGIN
    UPDATE zoo.account SET balance = balance - amount WHERE id = src;
    UPDATE zoo.account SET balance = balance + amount WHERE id = dst;
END $$;
COMMENT ON PROCEDURE move_balance(int, int, numeric) IS 'zoo: a procedure';
CREATE FUNCTION note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN NULL; END $$;
CREATE EVENT TRIGGER zoo_note_ddl ON ddl_command_end WHEN TAG IN ('CREATE TABLE') EXECUTE FUNCTION note_ddl();
COMMENT ON EVENT TRIGGER zoo_note_ddl IS 'zoo: an event trigger';

CREATE STATISTICS child_stats (ndistinct, dependencies, mcv) ON parent_id, qty FROM child;
COMMENT ON STATISTICS child_stats IS 'zoo: extended statistics';
CREATE STATISTICS types_expr_stats ON (i4 % 10), lower(t) FROM types;

CREATE INDEX child_parent ON child (parent_id) INCLUDE (qty);
ALTER TABLE child CLUSTER ON child_parent;
COMMENT ON INDEX child_parent IS 'zoo: an index, CLUSTER ON';
CREATE INDEX types_jb ON types USING gin (jb jsonb_path_ops);
CREATE INDEX types_tv ON types USING gin (tv);
CREATE INDEX types_bx ON types USING gist (bx);
CREATE INDEX types_ip ON types USING spgist (ip inet_ops);
CREATE INDEX types_ts ON types USING brin (ts) WITH (pages_per_range = 16);
CREATE INDEX types_u ON types USING hash (u);
CREATE INDEX types_i4 ON types (i4 int4_plain_ops DESC NULLS FIRST) WHERE i4 > 0;
CREATE INDEX types_lower_t ON types (lower(t) COLLATE "C" text_pattern_ops);
CREATE INDEX account_title ON account (title varchar_pattern_ops, id);

ANALYZE;
