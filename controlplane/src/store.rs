//! The control plane's durable state in embedded SQLite: the operator's
//! switches (kills, drains, overrides), the append-only audit log of every
//! admin action, the last published decision and version, so a restarted
//! control plane resumes where it stopped, and the spend ledger that
//! spend budgets are judged on (per endpoint and minute, kept a day).
//!
//! A switch and its audit entry are written in one transaction: there is
//! never a switch in force that the log does not explain. Triggers refuse
//! any UPDATE or DELETE on the audit table, so "append-only" holds for
//! anything that goes through SQLite, not just for this code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parking_lot::{Mutex, MutexGuard};
use rusqlite::{params, Connection, OptionalExtension};

use crate::weights::{Decision, Override, Switches};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("stored decision is unreadable: {0}")]
    Decode(#[from] serde_json::Error),
}

/// What an admin action switches on or off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Endpoint(String),
    Provider(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Endpoint(e) => write!(f, "endpoint {e}"),
            Target::Provider(p) => write!(f, "provider {p}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Kill(Target),
    /// Undoes a kill and, for an endpoint, a drain.
    Revive(Target),
    Drain(String),
    Override(Override),
    ClearOverride {
        endpoint: String,
        class: Option<String>,
    },
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Kill(_) => "kill",
            Action::Revive(_) => "revive",
            Action::Drain(_) => "drain",
            Action::Override(_) => "override",
            Action::ClearOverride { .. } => "clear-override",
        }
    }

    fn target(&self) -> String {
        match self {
            Action::Kill(t) | Action::Revive(t) => t.to_string(),
            Action::Drain(e) => Target::Endpoint(e.clone()).to_string(),
            Action::Override(o) => Target::Endpoint(o.endpoint.clone()).to_string(),
            Action::ClearOverride { endpoint, .. } => {
                Target::Endpoint(endpoint.clone()).to_string()
            }
        }
    }

    fn detail(&self) -> String {
        let class = |c: &Option<String>| {
            c.as_ref()
                .map_or_else(|| "every class".to_string(), |c| format!("class {c}"))
        };
        match self {
            Action::Override(o) => format!(
                "weight {} in {} until {} ms since the epoch",
                o.weight,
                class(&o.class),
                o.expires_ms
            ),
            Action::ClearOverride { class: c, .. } => format!("override in {} removed", class(c)),
            _ => String::new(),
        }
    }
}

/// One line of the audit log.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub reason: String,
}

pub struct Store {
    conn: Mutex<Connection>,
    path: Option<PathBuf>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS switches (
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    class TEXT NOT NULL DEFAULT '',
    weight REAL,
    expires_ms INTEGER,
    reason TEXT NOT NULL,
    audit_id INTEGER NOT NULL REFERENCES audit(id),
    PRIMARY KEY (kind, target, class)
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS spend (
    endpoint TEXT NOT NULL,
    minute INTEGER NOT NULL,
    usd REAL NOT NULL,
    PRIMARY KEY (endpoint, minute)
);
";

/// How long booked spend is kept; spend budgets look back one hour.
const SPEND_KEPT_MS: u64 = 24 * 3_600_000;

impl Store {
    /// Opens (creating if needed) the database at `path`; `None` keeps
    /// everything in memory, gone with the process.
    pub fn open(path: Option<&Path>) -> Result<Store, StoreError> {
        let conn = match path {
            Some(p) => Connection::open(p).map_err(|source| StoreError::Open {
                path: p.to_path_buf(),
                source,
            })?,
            None => Connection::open_in_memory()?,
        };
        // WAL: readers (status, audit) never wait for the writer.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
            path: path.map(Path::to_path_buf),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock()
    }

    /// Applies an action and logs it, atomically. Returns the audit id.
    pub fn apply(
        &self,
        actor: &str,
        reason: &str,
        action: &Action,
        now_ms: u64,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO audit (at_ms, actor, action, target, detail, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now_ms as i64, actor, action.name(), action.target(), action.detail(), reason],
        )?;
        let id = tx.last_insert_rowid();
        let upsert = "INSERT OR REPLACE INTO switches (kind, target, class, weight, expires_ms, reason, audit_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
        match action {
            Action::Kill(Target::Endpoint(e)) => {
                tx.execute(
                    upsert,
                    params!["kill", e, "", None::<f64>, None::<i64>, reason, id],
                )?;
            }
            Action::Kill(Target::Provider(p)) => {
                tx.execute(
                    upsert,
                    params!["kill_provider", p, "", None::<f64>, None::<i64>, reason, id],
                )?;
            }
            Action::Revive(Target::Endpoint(e)) => {
                tx.execute(
                    "DELETE FROM switches WHERE kind IN ('kill', 'drain') AND target = ?1",
                    params![e],
                )?;
            }
            Action::Revive(Target::Provider(p)) => {
                tx.execute(
                    "DELETE FROM switches WHERE kind = 'kill_provider' AND target = ?1",
                    params![p],
                )?;
            }
            Action::Drain(e) => {
                tx.execute(
                    upsert,
                    params!["drain", e, "", None::<f64>, None::<i64>, reason, id],
                )?;
            }
            Action::Override(o) => {
                tx.execute(
                    upsert,
                    params![
                        "override",
                        o.endpoint,
                        o.class.clone().unwrap_or_default(),
                        o.weight,
                        o.expires_ms.min(i64::MAX as u64) as i64,
                        reason,
                        id
                    ],
                )?;
            }
            Action::ClearOverride { endpoint, class } => {
                tx.execute(
                    "DELETE FROM switches WHERE kind = 'override' AND target = ?1 AND class = ?2",
                    params![endpoint, class.clone().unwrap_or_default()],
                )?;
            }
        }
        tx.commit()?;
        Ok(id)
    }

    /// The switches in force at `now_ms` (expired overrides left out).
    pub fn switches(&self, now_ms: u64) -> Result<Switches, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT kind, target, class, weight, expires_ms, reason FROM switches")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<f64>>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, String>(5)?,
            ))
        })?;
        let mut sw = Switches::default();
        for row in rows {
            let (kind, target, class, weight, expires, reason) = row?;
            match kind.as_str() {
                "kill" => {
                    sw.killed.insert(target, reason);
                }
                "kill_provider" => {
                    sw.killed_providers.insert(target, reason);
                }
                "drain" => {
                    sw.drained.insert(target, reason);
                }
                "override" => {
                    let expires_ms = expires.unwrap_or(0).max(0) as u64;
                    if expires_ms > now_ms {
                        sw.overrides.push(Override {
                            endpoint: target,
                            class: (!class.is_empty()).then_some(class),
                            weight: weight.unwrap_or(0.0),
                            expires_ms,
                        });
                    }
                }
                other => tracing::warn!(
                    kind = other,
                    "unknown switch kind in the state database; ignored"
                ),
            }
        }
        Ok(sw)
    }

    /// The last `limit` audit entries, oldest first.
    pub fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, at_ms, actor, action, target, detail, reason FROM
             (SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = stmt.query_map(params![limit], |r| {
            Ok(AuditEntry {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                detail: r.get(5)?,
                reason: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn save_decision(&self, version: u64, d: &Decision) -> Result<(), StoreError> {
        let json = serde_json::to_string(d)?;
        let conn = self.conn();
        conn.execute(
            "INSERT OR REPLACE INTO state (key, value) VALUES ('decision', ?1), ('version', ?2)",
            params![json, version.to_string()],
        )?;
        Ok(())
    }

    /// Books reported spend into the ledger, in the minute of `now_ms`, in
    /// one transaction, and forgets minutes older than a day.
    pub fn book_spend(&self, now_ms: u64, spend: &[(String, f64)]) -> Result<(), StoreError> {
        let minute = (now_ms / 60_000) as i64;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (endpoint, usd) in spend {
            tx.execute(
                "INSERT INTO spend (endpoint, minute, usd) VALUES (?1, ?2, ?3)
                 ON CONFLICT (endpoint, minute) DO UPDATE SET usd = usd + excluded.usd",
                params![endpoint, minute, usd],
            )?;
        }
        let oldest = (now_ms.saturating_sub(SPEND_KEPT_MS) / 60_000) as i64;
        tx.execute("DELETE FROM spend WHERE minute < ?1", params![oldest])?;
        tx.commit()?;
        Ok(())
    }

    /// Spend per endpoint booked in the last hour before `now_ms` (whole
    /// minutes: the current one and the 59 before it).
    pub fn spend_last_hour(&self, now_ms: u64) -> Result<BTreeMap<String, f64>, StoreError> {
        let to = now_ms / 60_000;
        let from = to.saturating_sub(59);
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT endpoint, SUM(usd) FROM spend WHERE minute BETWEEN ?1 AND ?2 GROUP BY endpoint",
        )?;
        let rows = stmt.query_map(params![from as i64, to as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The last saved version and decision, if any.
    pub fn load_decision(&self) -> Result<Option<(u64, Decision)>, StoreError> {
        let conn = self.conn();
        let get = |key: &str| {
            conn.query_row(
                "SELECT value FROM state WHERE key = ?1",
                params![key],
                |r| r.get::<_, String>(0),
            )
            .optional()
        };
        let (Some(v), Some(d)) = (get("version")?, get("decision")?) else {
            return Ok(None);
        };
        Ok(Some((v.parse().unwrap_or(0), serde_json::from_str(&d)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-store-{label}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("state.db")
    }

    #[test]
    fn the_spend_ledger_sums_the_last_hour_and_survives_a_reopen() {
        let path = temp_db("spend");
        let hour = 3_600_000;
        let t0 = 10 * 24 * hour;
        {
            let s = Store::open(Some(&path)).unwrap();
            s.book_spend(t0, &[("a".into(), 1.5), ("b".into(), 0.25)])
                .unwrap();
            s.book_spend(t0 + 1_000, &[("a".into(), 0.5)]).unwrap();
            s.book_spend(t0 + 30 * 60_000, &[("a".into(), 2.0)])
                .unwrap();
        }
        let s = Store::open(Some(&path)).unwrap();
        let at = |ms| s.spend_last_hour(ms).unwrap();
        assert_eq!(at(t0 + 60_000).get("a"), Some(&2.0));
        assert_eq!(at(t0 + 30 * 60_000).get("a"), Some(&4.0));
        assert_eq!(at(t0 + 30 * 60_000).get("b"), Some(&0.25));
        // An hour on, the first minute has left the window.
        assert_eq!(at(t0 + hour).get("a"), Some(&2.0));
        assert_eq!(at(t0 + hour).get("b"), None);
        // A day on, booking forgets what is older than a day.
        s.book_spend(t0 + 25 * hour, &[]).unwrap();
        let rows: i64 = s
            .conn()
            .query_row("SELECT COUNT(*) FROM spend", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn switches_and_the_audit_log_survive_a_reopen() {
        let path = temp_db("reopen");
        {
            let s = Store::open(Some(&path)).unwrap();
            s.apply(
                "ana",
                "fire",
                &Action::Kill(Target::Endpoint("a".into())),
                1,
            )
            .unwrap();
            s.apply(
                "ana",
                "bill",
                &Action::Kill(Target::Provider("p".into())),
                2,
            )
            .unwrap();
            s.apply("bo", "maint", &Action::Drain("b".into()), 3)
                .unwrap();
            s.apply(
                "bo",
                "test",
                &Action::Override(Override {
                    endpoint: "c".into(),
                    class: Some("std".into()),
                    weight: 0.25,
                    expires_ms: 100,
                }),
                4,
            )
            .unwrap();
            let mut d = Decision::default();
            d.classes.insert("std".into(), Default::default());
            s.save_decision(42, &d).unwrap();
        }
        let s = Store::open(Some(&path)).unwrap();
        let sw = s.switches(50).unwrap();
        assert_eq!(sw.killed.get("a").map(String::as_str), Some("fire"));
        assert!(sw.killed_providers.contains_key("p"));
        assert!(sw.drained.contains_key("b"));
        assert_eq!(sw.overrides.len(), 1);
        assert!(s.switches(100).unwrap().overrides.is_empty(), "expired");
        let (v, d) = s.load_decision().unwrap().unwrap();
        assert_eq!(v, 42);
        assert!(d.classes.contains_key("std"));

        s.apply(
            "cy",
            "fixed",
            &Action::Revive(Target::Endpoint("a".into())),
            5,
        )
        .unwrap();
        s.apply(
            "cy",
            "done",
            &Action::Revive(Target::Endpoint("b".into())),
            6,
        )
        .unwrap();
        let sw = s.switches(50).unwrap();
        assert!(sw.killed.is_empty() && sw.drained.is_empty());
        let log = s.audit(100).unwrap();
        let actions: Vec<_> = log.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            ["kill", "kill", "drain", "override", "revive", "revive"]
        );
        assert_eq!(log[0].actor, "ana");
        assert_eq!(log[0].target, "endpoint a");
        assert_eq!(log[1].target, "provider p");
        assert_eq!(log[3].reason, "test");
        assert!(log[3].detail.contains("class std"), "{}", log[3].detail);
        let last_two = s.audit(2).unwrap();
        assert_eq!(last_two.iter().map(|e| e.id).collect::<Vec<_>>(), [5, 6]);
    }

    #[test]
    fn the_stored_decision_keeps_its_over_budget_key() {
        // Decision::over_spend_budget is stored as `over_budget`, as before
        // the field was renamed: a saved decision loads either way.
        let mut d = Decision::default();
        d.over_spend_budget.insert("a".into(), "spent".into());
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains(r#""over_budget":{"a":"spent"}"#), "{json}");
        let back: Decision = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn the_audit_log_refuses_edits() {
        let s = Store::open(None).unwrap();
        s.apply("ana", "x", &Action::Drain("a".into()), 1).unwrap();
        let conn = s.conn();
        let e = conn
            .execute("UPDATE audit SET actor = 'mallory'", [])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        assert!(conn.execute("DELETE FROM audit", []).is_err());
    }
}
