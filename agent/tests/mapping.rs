//! `migrate.map` end to end on real clusters: schemas, tables and columns
//! renamed (with a view and foreign keys depending on them), a row filter
//! whose rows move in and out of it with unchanged TOAST values, and a
//! masked column, each through schema, full copy and stream under load,
//! verified equal through the mapping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decant_tests::task::Task;
use decant_tests::Cluster;

/// A task of all three types with `migrate.map = <map>`.
fn task(map: &str) -> Task {
    Task::builder(env!("CARGO_BIN_EXE_decant"), "map")
        .migrate("types = [\"schema\", \"full\", \"incremental\"]")
        .set("migrate.map", map)
        .build()
}

fn rows(client: &mut postgres::Client, query: &str) -> Vec<String> {
    client.query(&format!("SELECT t::text FROM ({query}) t ORDER BY 1"), &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

/// Writes to the source until stopped: a stream of changes during the
/// copy and the stream.
fn load(source: &Cluster, sql: &'static str) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut client = source.connect();
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut n = 0u64;
        while !flag.load(Ordering::Relaxed) {
            client.batch_execute(sql).unwrap();
            n += 1;
        }
        n
    });
    (stop, handle)
}

#[test]
fn schemas_tables_and_columns_are_renamed_with_what_depends_on_them() {
    let t = task(
        "[{ schema = \"sales\", to = \"shop\" },\n\
                { table = \"sales.orders\", to = \"purchases\", columns = { note = \"remark\" } },\n\
                { table = \"public.people\", to = \"crm.customers\", columns = { full_name = \"name\" } }]",
    );
    t.source
        .connect()
        .batch_execute(
            "CREATE TABLE people (id serial PRIMARY KEY, full_name text NOT NULL);
             CREATE SCHEMA sales;
             CREATE TABLE sales.orders (id bigserial PRIMARY KEY, person_id int REFERENCES people (id),
                                        note text, amount numeric(12,2) NOT NULL);
             CREATE INDEX orders_note ON sales.orders (note);
             CREATE VIEW sales.big_orders AS SELECT o.id, o.note, p.full_name FROM sales.orders o JOIN people p ON p.id = o.person_id
                     WHERE o.amount > 50;
             CREATE TABLE sales.items (order_id bigint REFERENCES sales.orders (id), sku text, PRIMARY KEY (order_id, sku));
             INSERT INTO people (full_name) SELECT 'person ' || g FROM generate_series(1, 200) g;
             INSERT INTO sales.orders (person_id, note, amount) SELECT 1 + g % 200, 'note ' || g, g % 100 FROM generate_series(1, 3000) g;
             INSERT INTO sales.items SELECT g, 'sku' || g FROM generate_series(1, 1000) g;",
        )
        .unwrap();
    let (stop, writer) = load(
        &t.source,
        "INSERT INTO people (full_name) VALUES ('new person');
         INSERT INTO sales.orders (person_id, note, amount) VALUES (1 + (random() * 199)::int, 'live', 75);
         UPDATE sales.orders SET note = note || '!', amount = amount + 1 WHERE id = 1 + (random() * 2999)::int;
         DELETE FROM sales.items WHERE order_id = (SELECT min(order_id) FROM sales.items);
         UPDATE people SET full_name = full_name || '.' WHERE id = 1 + (random() * 199)::int;",
    );
    let mut m = t.migrate_until_incremental("migrate.log", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    let out = t.assert_equal();
    assert!(out.contains("sales.orders -> shop.purchases") && out.contains("public.people -> crm.customers"), "{out}");

    let mut dst = t.dest.connect();
    let mut src = t.source.connect();
    // The objects are there under their new names only.
    let names = rows(
        &mut dst,
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname IN ('public', 'sales', 'shop', 'crm') AND c.relkind IN ('r', 'v')",
    );
    assert_eq!(names, ["(crm.customers)", "(shop.big_orders)", "(shop.items)", "(shop.purchases)"]);
    // The view follows the renames, and shows what the source's shows.
    assert_eq!(rows(&mut dst, "SELECT * FROM shop.big_orders"), rows(&mut src, "SELECT * FROM sales.big_orders"), "the view differs");
    let view: String = dst.query_one("SELECT pg_get_viewdef('shop.big_orders')", &[]).unwrap().get(0);
    assert!(view.contains("purchases") && view.contains("customers") && view.contains("remark"), "{view}");
    // Indexes and foreign keys are on the renamed tables and columns.
    let fks = rows(&mut dst, "SELECT conrelid::regclass, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'f'");
    assert_eq!(
        fks,
        [
            "(shop.items,\"FOREIGN KEY (order_id) REFERENCES shop.purchases(id)\")",
            "(shop.purchases,\"FOREIGN KEY (person_id) REFERENCES crm.customers(id)\")"
        ]
    );
    let index: String = dst.query_one("SELECT pg_get_indexdef('shop.orders_note'::regclass)", &[]).unwrap().get(0);
    assert!(index.contains("shop.purchases") && index.contains("(remark)"), "{index}");

    // Cutover sets the sequences where the mapping put them.
    assert!(m.is_running(), "{}", m.log());
    let (ok, out) = t.command(&["cutover", "--wait", "60"]);
    assert!(ok, "cutover failed:\n{out}");
    for (source_seq, dest_seq) in [("sales.orders_id_seq", "shop.orders_id_seq"), ("public.people_id_seq", "crm.people_id_seq")] {
        let s: i64 = src.query_one(&format!("SELECT last_value FROM {source_seq}"), &[]).unwrap().get(0);
        let d: i64 = dst.query_one(&format!("SELECT last_value FROM {dest_seq}"), &[]).unwrap().get(0);
        assert!(d >= s, "{dest_seq} is at {d}, the source's at {s}");
    }
    let _ = m.stop();
}

#[test]
fn a_row_filter_moves_rows_in_and_out_and_a_transform_masks_a_column() {
    let t = task("[{ table = \"public.users\", where = \"tenant = 1\", set = { email = \"regexp_replace(email, '^[^@]+', 'xxx')\" } }]");
    // bio is large and stored out of line (TOAST): updates that do not
    // touch it carry no value for it.
    t.source
        .connect()
        .batch_execute(
            "CREATE TABLE users (id int PRIMARY KEY, tenant int NOT NULL, email text NOT NULL, bio text);
             ALTER TABLE users REPLICA IDENTITY FULL;
             ALTER TABLE users ALTER COLUMN bio SET STORAGE EXTERNAL;
             INSERT INTO users SELECT g, 1 + g % 2, 'user' || g || '@example.com', repeat('b' || g, 3000) FROM generate_series(1, 400) g;
             CREATE TABLE other (id int PRIMARY KEY, v int);
             INSERT INTO other SELECT g, g FROM generate_series(1, 100) g;",
        )
        .unwrap();
    let (stop, writer) = load(&t.source, "UPDATE other SET v = v + 1 WHERE id = 1 + (random() * 99)::int;");
    let mut m = t.migrate_until_incremental("migrate.log", Duration::from_secs(120));
    let mut src = t.source.connect();
    src.batch_execute(
        // In: tenant 2 -> 1, bio unchanged (from the old row).
        "UPDATE users SET tenant = 1 WHERE id BETWEEN 1 AND 21 AND tenant = 2;
         -- Out: tenant 1 -> 2.
         UPDATE users SET tenant = 2 WHERE id BETWEEN 30 AND 50 AND tenant = 1;
         -- Within the filter, bio unchanged; and outside it.
         UPDATE users SET email = 'changed' || id || '@example.org' WHERE id BETWEEN 60 AND 80;
         -- In and out within one transaction, and a key change into the filter.
         BEGIN;
         UPDATE users SET tenant = 1 WHERE id = 101;
         UPDATE users SET tenant = 2 WHERE id = 101;
         UPDATE users SET id = 1001, tenant = 1 WHERE id = 103;
         COMMIT;
         INSERT INTO users VALUES (2001, 1, 'new1@example.com', repeat('n', 50000)), (2002, 2, 'new2@example.com', 'short');
         DELETE FROM users WHERE id IN (2, 3);",
    )
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let out = t.assert_equal();
    assert!(out.contains("all 2 tables equal"), "{out}");

    // What verify compared, checked row by row: exactly the source's
    // tenant-1 rows, masked, with their whole bio.
    let mut dst = t.dest.connect();
    let expected =
        rows(&mut src, "SELECT id, tenant, regexp_replace(email, '^[^@]+', 'xxx'), md5(bio), length(bio) FROM users WHERE tenant = 1");
    let arrived = rows(&mut dst, "SELECT id, tenant, email, md5(bio), length(bio) FROM users");
    assert_eq!(arrived, expected);
    assert!(arrived.iter().any(|r| r.starts_with("(1,1,xxx@example.com,")), "a row moved into the filter: {arrived:?}");
    assert!(arrived.iter().any(|r| r.starts_with("(1001,")) && !arrived.iter().any(|r| r.starts_with("(103,")));
    assert!(!arrived.iter().any(|r| r.starts_with("(31,") || r.starts_with("(101,")), "rows moved out of the filter");
    assert!(m.is_running(), "{}", m.log());
    assert_eq!(m.stop(), Some(0));
}

#[test]
fn precheck_refuses_what_the_mapping_could_not_do() {
    let t = task(
        "[{ schema = \"sales\", to = \"shop\" }, { table = \"sales.notes\", where = \"id > 0\" }, \
          { table = \"sales.gone\", to = \"x\" }]",
    );
    t.src().batch_execute("CREATE SCHEMA sales; CREATE TABLE sales.notes (id int PRIMARY KEY, body text)").unwrap();
    t.dst().batch_execute("CREATE SCHEMA shop").unwrap();
    let (ok, out) = t.command(&["precheck"]);
    assert!(!ok, "{out}");
    // The renamed schema's new name is taken on the destination.
    assert!(out.contains("destination.conflicts") && out.contains("renames schema sales to shop"), "{out}");
    // A filtered table with a TOASTable column streams only with whole old rows.
    assert!(out.contains("tables.mapping") && out.contains("ALTER TABLE \"sales\".\"notes\" REPLICA IDENTITY FULL;"), "{out}");
    // An entry that names no selected table does nothing.
    assert!(out.contains("sales.gone") && out.contains("the entry does nothing"), "{out}");
    t.src().batch_execute("ALTER TABLE sales.notes REPLICA IDENTITY FULL").unwrap();
    t.dst().batch_execute("DROP SCHEMA shop").unwrap();
    let (_, out) = t.command(&["precheck"]);
    assert!(!out.contains("REPLICA IDENTITY FULL;") && !out.contains("renames schema"), "{out}");
}
