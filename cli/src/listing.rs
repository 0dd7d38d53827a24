//! How `hoard ls` shows an entry, following `ls -l` and `ls -b`.
//!
//! Guarantees: a mode string shows the set-user-id, set-group-id and sticky bits as `ls` does
//! (`s`/`S`, `t`/`T`); a device shows `major, minor` where other entries show their size; and
//! a name prints on one line whatever bytes it holds, and different names print differently:
//! bytes that are not UTF-8 and control characters are escaped as `ls -b` escapes them (`\n`,
//! `\t`, … and `\ooo` in octal), and a backslash is doubled. Unlike `ls -b`, spaces stay as
//! they are: entries are one per line, so a space cannot be mistaken for a separator.

use std::future::Future;
use std::pin::Pin;

use hoard_core::tree::{Node, NodeKind};
use hoard_core::{Id, Repository};

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`hoard_core::browse::walk`] with each path as the bytes the snapshot records (`prefix`,
/// then `/name` per level): names need not be UTF-8, and a listing shows them as they are.
pub fn walk<'a, F>(
    repo: &'a Repository,
    tree: Id,
    prefix: Vec<u8>,
    visit: &'a mut F,
) -> BoxFut<'a, Result<(), hoard_core::Error>>
where
    F: FnMut(&[u8], &Node) + Send,
{
    Box::pin(async move {
        let t = repo.load_tree(&tree).await?;
        for node in &t.nodes {
            let mut path = prefix.clone();
            path.push(b'/');
            path.extend_from_slice(&node.name);
            visit(&path, node);
            if let (NodeKind::Dir, Some(sub)) = (node.kind, node.subtree) {
                walk(repo, sub, path, visit).await?;
            }
        }
        Ok(())
    })
}

/// `drwxr-xr-x`, with set-id and sticky bits in the execute positions.
pub fn mode_string(kind: NodeKind, mode: u32) -> String {
    let t = match kind {
        NodeKind::Dir => 'd',
        NodeKind::Symlink => 'l',
        NodeKind::Fifo => 'p',
        NodeKind::Socket => 's',
        NodeKind::CharDevice => 'c',
        NodeKind::BlockDevice => 'b',
        NodeKind::File => '-',
    };
    let mut s = String::from(t);
    // (shift of the rwx triple, the special bit shown in its x position, its letter)
    for (shift, special, letter) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let b = (mode >> shift) & 7;
        s.push(if b & 4 != 0 { 'r' } else { '-' });
        s.push(if b & 2 != 0 { 'w' } else { '-' });
        s.push(match (mode & special != 0, b & 1 != 0) {
            (true, true) => letter,
            (true, false) => letter.to_ascii_uppercase(),
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// The size column: `major, minor` for a device, else the size in bytes.
pub fn size_column(n: &Node) -> String {
    match n.kind {
        NodeKind::CharDevice | NodeKind::BlockDevice => {
            format!("{}, {}", rustix::fs::major(n.rdev), rustix::fs::minor(n.rdev))
        }
        _ => n.size.to_string(),
    }
}

/// `name` as `ls -b` shows it (see the module docs).
pub fn escape_name(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\x07' => out.push_str("\\a"),
                '\x08' => out.push_str("\\b"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\x0b' => out.push_str("\\v"),
                '\x0c' => out.push_str("\\f"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    octal(&mut out, c.encode_utf8(&mut buf).as_bytes());
                }
                c => out.push(c),
            }
        }
        octal(&mut out, chunk.invalid());
    }
    out
}

fn octal(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push_str(&format!("\\{b:03o}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_strings_show_set_id_and_sticky_bits_like_ls() {
        assert_eq!(mode_string(NodeKind::File, 0o644), "-rw-r--r--");
        assert_eq!(mode_string(NodeKind::File, 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(NodeKind::File, 0o4644), "-rwSr--r--");
        assert_eq!(mode_string(NodeKind::File, 0o2755), "-rwxr-sr-x");
        assert_eq!(mode_string(NodeKind::File, 0o2745), "-rwxr-Sr-x");
        assert_eq!(mode_string(NodeKind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(NodeKind::Dir, 0o1770), "drwxrwx--T");
        assert_eq!(mode_string(NodeKind::CharDevice, 0o7777), "crwsrwsrwt");
    }

    #[test]
    fn devices_show_major_and_minor() {
        let mut n = Node::new(b"sda1".to_vec(), NodeKind::BlockDevice);
        n.rdev = rustix::fs::makedev(8, 1);
        assert_eq!(size_column(&n), "8, 1");
        // Large minors use the split encoding of dev_t.
        n.rdev = rustix::fs::makedev(259, 300_000);
        assert_eq!(size_column(&n), "259, 300000");
        let mut f = Node::new(b"f".to_vec(), NodeKind::File);
        f.size = 12345;
        assert_eq!(size_column(&f), "12345");
    }

    #[test]
    fn names_are_escaped_like_ls_b() {
        assert_eq!(escape_name(b"plain name.txt"), "plain name.txt");
        assert_eq!(escape_name("héllo ✓".as_bytes()), "héllo ✓");
        assert_eq!(escape_name(b"two\nlines"), "two\\nlines");
        assert_eq!(escape_name(b"tab\there\r"), "tab\\there\\r");
        assert_eq!(escape_name(b"back\\slash"), "back\\\\slash");
        assert_eq!(escape_name(b"latin1-\xe9t\xe9"), "latin1-\\351t\\351");
        assert_eq!(escape_name(b"\x01\x1b[31m\x7f"), "\\001\\033[31m\\177");
        assert_eq!(escape_name("c1-\u{85}".as_bytes()), "c1-\\302\\205");
        // Different names never print the same.
        assert_ne!(escape_name(b"a\\n"), escape_name(b"a\n"));
        assert_ne!(escape_name(b"\\351"), escape_name(b"\xe9"));
    }
}
