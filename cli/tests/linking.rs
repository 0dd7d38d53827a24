//! How the `hoard` binary is linked (see cli/build.rs).

/// The dynamic section's entries (tag, value) of a little-endian ELF64 file, or `None` if it is
/// not one.
fn dynamic_entries(elf: &[u8]) -> Option<Vec<(u64, u64)>> {
    let u16_at = |at: usize| elf.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| elf.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    let u64_at = |at: usize| elf.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let (phentsize, phnum) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    const PT_DYNAMIC: u32 = 2;
    let dynamic = (0..phnum).map(|i| phoff + i * phentsize).find(|&ph| u32_at(ph) == Some(PT_DYNAMIC))?;
    let offset = usize::try_from(u64_at(dynamic + 8)?).ok()?;
    let size = usize::try_from(u64_at(dynamic + 32)?).ok()?;
    let entries = (offset..offset + size)
        .step_by(16)
        .map_while(|at| Some((u64_at(at)?, u64_at(at + 8)?)))
        .take_while(|&(tag, _)| tag != 0)
        .collect();
    Some(entries)
}

/// Relative relocations are packed (DT_RELR): unpacked, the dynamic linker read ~740 KiB of
/// them at every start, and they were part of the key derivation's memory peak.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn relative_relocations_are_packed() {
    const DT_RELASZ: u64 = 8;
    const DT_RELR: u64 = 36;
    let elf = std::fs::read(env!("CARGO_BIN_EXE_hoard")).unwrap();
    let entries = dynamic_entries(&elf).expect("hoard is a little-endian ELF64 file with a dynamic section");
    assert!(entries.iter().any(|&(tag, _)| tag == DT_RELR), "no DT_RELR entry: {entries:?}");
    let rela_bytes = entries.iter().find(|&&(tag, _)| tag == DT_RELASZ).map_or(0, |&(_, v)| v);
    assert!(rela_bytes < 64 * 1024, "{rela_bytes} bytes of unpacked relocations remain");
}
