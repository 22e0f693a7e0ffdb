//! A structural check of a shared library before `dlopen` sees it: the dynamic loader maps segments
//! without checking that the file holds them, so a truncated library would crash the process.

/// Checks that `bytes` is a complete 64-bit little-endian ELF shared object for this machine.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    if u16_at(16) != Some(3) {
        return Err("not a shared library (ELF type is not ET_DYN)".into());
    }
    let machine = u16_at(18).unwrap_or(0);
    let expected = if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else {
        machine
    };
    if machine != expected {
        return Err(format!("built for another machine (ELF machine {machine})"));
    }
    let len = bytes.len() as u64;
    let truncated = || "truncated (the file is shorter than its headers say)".to_string();
    let (phoff, shoff) = (
        u64_at(32).ok_or_else(truncated)?,
        u64_at(40).ok_or_else(truncated)?,
    );
    let (phentsize, phnum) = (
        u16_at(54).ok_or_else(truncated)? as u64,
        u16_at(56).ok_or_else(truncated)? as u64,
    );
    let (shentsize, shnum) = (
        u16_at(58).ok_or_else(truncated)? as u64,
        u16_at(60).ok_or_else(truncated)? as u64,
    );
    if phoff.saturating_add(phentsize.saturating_mul(phnum)) > len
        || shoff.saturating_add(shentsize.saturating_mul(shnum)) > len
    {
        return Err(truncated());
    }
    for i in 0..phnum {
        let ph = (phoff + i * phentsize) as usize;
        let kind = bytes
            .get(ph..ph + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        let (offset, filesz) = (
            u64_at(ph + 8).ok_or_else(truncated)?,
            u64_at(ph + 32).ok_or_else(truncated)?,
        );
        // PT_LOAD, PT_DYNAMIC: the loader reads these from the file.
        if matches!(kind, Some(1) | Some(2)) && offset.saturating_add(filesz) > len {
            return Err(truncated());
        }
    }
    Ok(())
}
