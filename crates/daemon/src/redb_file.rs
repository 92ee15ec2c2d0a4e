//! Making a redb file so that a crash while it is made never leaves one that cannot be opened.
//!
//! redb initialises a new database in place: it sizes the file, writes the header, and writes
//! its magic number last. A process killed between the two (a `kill -9`, a machine dying just
//! as wgexitd first starts or a new day's attribution file is made) leaves a non-empty file
//! without the magic number, and every later open fails with "Not a redb database". So a new
//! database is made under a temporary name beside it and renamed into place once redb has
//! finished; an existing file is opened as it is.

use std::path::{Path, PathBuf};

use redb::Database;

#[derive(Debug, thiserror::Error)]
pub enum RedbFileError {
    #[error(transparent)]
    Database(#[from] redb::DatabaseError),
    #[error("cannot put the new database in place: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens the database at `path`, making it (atomically, see the module) when there is none.
pub fn create(path: &Path) -> Result<Database, RedbFileError> {
    if path.exists() {
        return Ok(Database::create(path)?);
    }
    let making = being_made(path);
    // What a crash left half-made is never opened: it is made again.
    wgexit::fsutil::remove_if_exists(&making)?;
    let db = Database::create(&making)?;
    std::fs::rename(&making, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(db)
}

/// Where the database of `path` is made before it is renamed into place.
fn being_made(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".making");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, TableDefinition};

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    #[test]
    fn a_half_made_file_left_by_a_crash_is_made_again_and_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.redb");
        // What a kill between redb's sizing and its magic number leaves, under the name a
        // new database is made with.
        std::fs::write(being_made(&path), vec![0u8; 4096]).unwrap();
        let db = create(&path).unwrap();
        assert!(!being_made(&path).exists());
        let txn = db.begin_write().unwrap();
        txn.open_table(T).unwrap().insert("a", 1).unwrap();
        txn.commit().unwrap();
        drop(db);

        // Reopened as it is, data kept.
        let db = create(&path).unwrap();
        let read = db.begin_read().unwrap();
        let value = read
            .open_table(T)
            .unwrap()
            .get("a")
            .unwrap()
            .map(|v| v.value());
        assert_eq!(value, Some(1));
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.redb");
        std::fs::write(&path, b"not a database").unwrap();
        assert!(create(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"not a database");
    }
}
