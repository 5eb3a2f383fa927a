use std::time::Duration;

use super::super::fold::{BULK_FLUSH_BYTES, FIRST_GROUP_FOLDED_BYTES};
use super::*;

fn settings() -> ApplySettings {
    ApplySettings {
        task_id: "t".into(),
        group_max_transactions: 3,
        group_max_bytes: 1000,
        group_max_delay: Duration::from_secs(1),
        pipeline_depth: 8,
        on_conflict: ConflictPolicy::Overwrite,
        apply_truncate: true,
        operations: Default::default(),
        apply_messages: true,
        split_merges: false,
        mapping: Default::default(),
        ddl: crate::config::DdlPolicy::Apply,
        selection: Default::default(),
    }
}

#[test]
fn a_group_records_its_last_source_commit() {
    let mut g = Group::new(Lsn(100), Instant::now());
    // No source transaction: its commit records no position.
    assert_eq!((g.position(), g.last_end), (None, Lsn(100)));
    g.source_commit(Lsn(200), 7);
    g.source_commit(Lsn(300), 9);
    assert_eq!((g.first_end, g.last_end, g.source_transactions, g.last_commit_time), (Lsn(200), Lsn(300), 2, 9));
    assert_eq!(g.position(), Some(Lsn(300)));
}

#[test]
fn a_group_ends_at_a_commit_once_a_bound_is_reached() {
    let s = settings();
    let start = Instant::now();
    let limit = FIRST_GROUP_FOLDED_BYTES;
    let mut g = Group::new(Lsn(0), start);
    // Without a source transaction a group never ends, whatever it holds.
    g.bytes = 5000;
    assert!(!g.is_full(&s, limit, limit, start + Duration::from_secs(5)));
    g.bytes = 0;
    g.source_commit(Lsn(1), 0);
    assert!(!g.is_full(&s, limit - 1, limit, start));
    g.source_commit(Lsn(2), 0);
    assert!(!g.is_full(&s, 0, limit, start + Duration::from_millis(999)));
    // Transactions.
    g.source_commit(Lsn(3), 0);
    assert!(g.is_full(&s, 0, limit, start));
    // Batch bytes, folded memory, time.
    let mut g = Group::new(Lsn(0), start);
    g.source_commit(Lsn(1), 0);
    g.bytes = 999;
    assert!(!g.is_full(&s, 0, limit, start));
    g.bytes = 1000;
    assert!(g.is_full(&s, 0, limit, start));
    g.bytes = 0;
    assert!(g.is_full(&s, limit, limit, start));
    assert!(g.is_full(&s, 0, limit, start + Duration::from_secs(1)));
    // A clock reading before the group's start is no elapsed time.
    let mut later = Group::new(Lsn(0), start + Duration::from_secs(10));
    later.source_commit(Lsn(1), 0);
    assert!(!later.is_full(&s, 0, limit, start));
}

#[test]
fn the_first_groups_fold_less_and_double() {
    let mut limits = vec![FIRST_GROUP_FOLDED_BYTES];
    for _ in 0..6 {
        limits.push(next_folded_limit(*limits.last().unwrap()));
    }
    let mb = 1 << 20;
    assert_eq!(limits, [mb / 2, mb, 2 * mb, 4 * mb, 8 * mb, 13 * mb, 13 * mb]);
    assert_eq!(next_folded_limit(GROUP_FOLDED_BYTES), GROUP_FOLDED_BYTES);
}

#[test]
fn a_group_of_small_transactions_ends_before_a_mid_transaction_merge() {
    // The group bound is reached first: its merge runs in the commit task,
    // while the next group is folded; only a large transaction merges
    // inside itself.
    const { assert!(FIRST_GROUP_FOLDED_BYTES < GROUP_FOLDED_BYTES) };
    const { assert!(BULK_FLUSH_BYTES > GROUP_FOLDED_BYTES) };
    let mut g = Group::new(Lsn(0), Instant::now());
    g.source_commit(Lsn(1), 0);
    assert!(g.is_full(&settings(), GROUP_FOLDED_BYTES, GROUP_FOLDED_BYTES, g.started));
}

#[test]
fn a_quiet_stream_commits_at_a_boundary_when_no_commit_runs() {
    let empty = Group::new(Lsn(0), Instant::now());
    let mut one = Group::new(Lsn(0), Instant::now());
    one.source_commit(Lsn(1), 0);
    assert!(commits_on_flush(false, false, Some(&one)));
    // The previous group still commits: the open one keeps growing.
    assert!(!commits_on_flush(true, false, Some(&one)));
    // Inside a source transaction: never.
    assert!(!commits_on_flush(false, true, Some(&one)));
    // Nothing to commit.
    assert!(!commits_on_flush(false, false, Some(&empty)));
    assert!(!commits_on_flush(false, false, None));
}

#[test]
fn a_resent_transaction_is_skipped_once_committed() {
    let mut p = Position::new(Lsn(100), HashMap::new());
    // The transaction that ended at 100 (its commit record before it) was applied.
    assert!(p.applied(Lsn(80)));
    assert!(p.applied(Lsn(99)));
    // One whose commit record starts at the position was not.
    assert!(!p.applied(Lsn(100)));
    assert!(!p.applied(Lsn(150)));
    // A group ending with the transaction at 150..200 commits.
    p.group_committed(Lsn(200), Lsn(5000));
    assert_eq!(p.committed(), Lsn(200));
    assert!(p.applied(Lsn(150)));
    assert!(!p.applied(Lsn(200)));
}

#[test]
fn a_commit_is_acked_only_once_durable() {
    let mut p = Position::new(Lsn(100), HashMap::new());
    assert!(!p.has_pending());
    assert_eq!(p.durable(), Lsn(100));
    p.group_committed(Lsn(200), Lsn(5000));
    p.group_committed(Lsn(300), Lsn(6000));
    // A new stream resumes after the last commit, but the source may not
    // yet discard what the destination could still lose.
    assert_eq!((p.committed(), p.durable()), (Lsn(300), Lsn(100)));
    assert!(p.has_pending());
    assert_eq!(p.flushed_to(Lsn(4999)), Lsn(100));
    assert_eq!(p.flushed_to(Lsn(5500)), Lsn(200));
    assert_eq!(p.flushed_to(Lsn(6000)), Lsn(300));
    assert!(!p.has_pending());
}

#[test]
fn a_recopied_tables_changes_before_its_snapshot_are_skipped() {
    let skip = HashMap::from([("\"public\".\"a\"".to_owned(), Lsn(500))]);
    let p = Position::new(Lsn(100), skip);
    assert!(p.in_copy("\"public\".\"a\"", Lsn(499)));
    assert!(!p.in_copy("\"public\".\"a\"", Lsn(500)));
    // Other tables are not affected.
    assert!(!p.in_copy("\"public\".\"b\"", Lsn(499)));
}

#[test]
fn after_a_crash_the_resent_stream_applies_each_transaction_once() {
    // (commit record, end) of five source transactions.
    let txns = [(10, 20), (20, 30), (35, 40), (40, 50), (55, 60)].map(|(f, e)| (Lsn(f), Lsn(e)));
    let mut p = Position::new(Lsn(0), HashMap::new());
    // The first group (three transactions) commits; the second (two) is
    // open when the applier is killed.
    let mut group = Group::new(p.committed(), Instant::now());
    for &(final_lsn, end) in &txns[..3] {
        assert!(!p.applied(final_lsn));
        group.source_commit(end, 0);
    }
    p.group_committed(group.position().unwrap(), Lsn(1000));
    let mut lost = Group::new(p.committed(), Instant::now());
    for &(_, end) in &txns[3..] {
        lost.source_commit(end, 0);
    }
    drop(lost);
    // The new applier reads the recorded position; the agent resends from
    // before it.
    let restarted = Position::new(p.committed(), HashMap::new());
    let applied: Vec<Lsn> = txns.iter().filter(|(f, _)| !restarted.applied(*f)).map(|(_, e)| *e).collect();
    assert_eq!(applied, [Lsn(50), Lsn(60)]);
}

#[test]
fn large_merges_of_untouched_tables_are_split() {
    let group = Group::new(Lsn(1), Instant::now());
    let g = Some(&group);
    assert!(splits(true, true, SPLIT_MIN_ROWS, g, 7));
    // No second connection, a table that does not allow it, too few keys.
    assert!(!splits(false, true, SPLIT_MIN_ROWS, g, 7));
    assert!(!splits(true, false, SPLIT_MIN_ROWS, g, 7));
    assert!(!splits(true, true, SPLIT_MIN_ROWS - 1, g, 7));
    assert!(!splits(true, true, SPLIT_MIN_ROWS, None, 7));
    // The group wrote the table on the main connection: its row locks
    // would hold the second connection up.
    let mut touched = Group::new(Lsn(1), Instant::now());
    touched.touched.insert(7);
    assert!(!splits(true, true, SPLIT_MIN_ROWS, Some(&touched), 7));
    assert!(splits(true, true, SPLIT_MIN_ROWS, Some(&touched), 8));
    // After a TRUNCATE nothing is split.
    let mut truncated = Group::new(Lsn(1), Instant::now());
    truncated.exclusive = true;
    assert!(!splits(true, true, SPLIT_MIN_ROWS, Some(&truncated), 8));
}
