//! The store group's snapshots on disk: every tree of a replica's store written entry by entry to
//! a file, and read back the same way, so that neither building, sending nor installing one
//! holds the store in memory (openraft reads and writes the file in chunks). The files are
//! anonymous — unlinked as soon as they are created, in the replica's data dir — so nothing is
//! left behind when openraft lets go of one, even after a crash.
//!
//! Format: a sequence of frames `[kind: u8][length: u32 LE][bytes]`: `TREE` (a tree's name; the
//! entries that follow are its), `KEY` then `VALUE` (one entry), and `END` (empty) last — a file
//! without it is cut short and refused.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

const END: u8 = 0;
const TREE: u8 = 1;
const KEY: u8 = 2;
const VALUE: u8 = 3;

/// Entries written to sled per batch while installing.
const INSTALL_BATCH: usize = 1024;

/// A new file in `dir`, already unlinked: it lives as long as its handles.
pub fn anonymous(dir: &Path) -> io::Result<File> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("snapshot-{}-{n}.tmp", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// Another handle of the anonymous file `file`, at its start, with an offset of its own (a
/// `try_clone` would share the offset, and reading one would move the other).
pub fn reopen(file: &File) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

fn frame(out: &mut impl Write, kind: u8, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a snapshot entry over 4 GiB"))?;
    out.write_all(&[kind])?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(bytes)
}

/// What a snapshot carries for an entry of a tree (named first) whose stored value is given:
/// the value itself where the tree holds only a pointer to it.
pub type Resolve<'a> = &'a dyn Fn(&[u8], sled::IVec) -> io::Result<sled::IVec>;

/// Writes the `trees` of `db` to a new file in `dir`, each value as `resolve` gives it;
/// returns the file (at its start) and its size.
pub fn write(
    db: &sled::Db,
    trees: &[sled::IVec],
    dir: &Path,
    resolve: Resolve<'_>,
) -> io::Result<(File, u64)> {
    let mut out = BufWriter::new(anonymous(dir)?);
    for name in trees {
        frame(&mut out, TREE, name)?;
        for entry in db.open_tree(name).map_err(io::Error::other)?.iter() {
            let (key, value) = entry.map_err(io::Error::other)?;
            frame(&mut out, KEY, &key)?;
            frame(&mut out, VALUE, &resolve(name, value)?)?;
        }
    }
    frame(&mut out, END, &[])?;
    let mut file = out.into_inner().map_err(|e| e.into_error())?;
    let size = file.stream_position()?;
    file.seek(SeekFrom::Start(0))?;
    Ok((file, size))
}

fn corrupt(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot: {why}"))
}

/// The next frame of `input`: its kind and bytes.
fn next(input: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    input.read_exact(&mut head).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => corrupt("cut short (no end)"),
        _ => e,
    })?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut bytes = vec![0; len];
    input.read_exact(&mut bytes)?;
    Ok((head[0], bytes))
}

/// Reads `file` from its start into `db`'s trees (which the caller emptied).
pub fn read(mut file: File, db: &sled::Db) -> io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut input = BufReader::new(file);
    let mut tree: Option<(sled::Tree, sled::Batch, usize)> = None;
    let flush = |tree: &mut Option<(sled::Tree, sled::Batch, usize)>| -> io::Result<()> {
        if let Some((tree, batch, _)) = tree.take() {
            tree.apply_batch(batch).map_err(io::Error::other)?;
        }
        Ok(())
    };
    loop {
        match next(&mut input)? {
            (END, _) => return flush(&mut tree),
            (TREE, name) => {
                flush(&mut tree)?;
                let opened = db.open_tree(name).map_err(io::Error::other)?;
                tree = Some((opened, sled::Batch::default(), 0));
            }
            (KEY, key) => {
                let (VALUE, value) = next(&mut input)? else {
                    return Err(corrupt("a key without its value"));
                };
                let Some((current, batch, count)) = tree.as_mut() else {
                    return Err(corrupt("an entry before any tree"));
                };
                batch.insert(key, value);
                *count += 1;
                if *count == INSTALL_BATCH {
                    let full = std::mem::take(batch);
                    current.apply_batch(full).map_err(io::Error::other)?;
                    *count = 0;
                }
            }
            (kind, _) => return Err(corrupt(&format!("unknown frame kind {kind}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_stored(_tree: &[u8], value: sled::IVec) -> io::Result<sled::IVec> {
        Ok(value)
    }

    fn db_with(entries: &[(&str, &[u8], &[u8])]) -> sled::Db {
        let db = sled::Config::new().temporary(true).open().unwrap();
        for (tree, key, value) in entries {
            db.open_tree(tree).unwrap().insert(key, *value).unwrap();
        }
        db
    }

    #[test]
    fn a_snapshot_file_holds_every_tree_and_entry_and_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![0xab; 3 * INSTALL_BATCH];
        let from = db_with(&[("a", b"k1", b"v1"), ("a", b"k2", b""), ("b", b"k", &big)]);
        for i in 0..(INSTALL_BATCH as u32 + 5) {
            from.open_tree("c")
                .unwrap()
                .insert(i.to_be_bytes(), &i.to_le_bytes())
                .unwrap();
        }
        let trees: Vec<sled::IVec> = ["a", "b", "c"].map(|n| n.as_bytes().into()).to_vec();
        let (file, size) = write(&from, &trees, dir.path(), &as_stored).unwrap();
        // Frames: 3 tree names, 2 + 1 + 1029 entries of two frames each, and the end.
        let expected = (3 * 5 + 3)
            + (2 * 5 + 2 + 2)
            + (2 * 5 + 2)
            + (2 * 5 + 1 + big.len())
            + 1029 * (2 * 5 + 8)
            + 5;
        assert_eq!(size, expected as u64);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "anonymous"
        );

        let to = db_with(&[]);
        read(file, &to).unwrap();
        for name in &trees {
            let (a, b) = (from.open_tree(name).unwrap(), to.open_tree(name).unwrap());
            let all = |t: &sled::Tree| t.iter().collect::<Result<Vec<_>, _>>().unwrap();
            assert_eq!(all(&a), all(&b));
        }
    }

    #[test]
    fn a_snapshot_cut_short_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let from = db_with(&[("a", b"k", b"v")]);
        let (file, size) = write(&from, &["a".as_bytes().into()], dir.path(), &as_stored).unwrap();
        file.set_len(size - 5).unwrap();
        let err = read(file, &db_with(&[])).unwrap_err();
        assert_eq!(err.to_string(), "snapshot: cut short (no end)");
    }
}
