//! This process's own ELF files, read for symbols: a read-only map of a file (pages are read
//! from the page cache only when touched, so an untouched debug section costs no memory), its
//! sections by name, and its functions from the symbol table. ELF64 little-endian only (x86_64
//! and aarch64 Linux). Every read is bounds-checked: a truncated or odd file gives an error or
//! fewer symbols, never a panic.

use std::fs::File;
use std::os::unix::io::AsRawFd;

const SHT_SYMTAB: u32 = 2;
const SHT_NOBITS: u32 = 8;
const SHT_DYNSYM: u32 = 11;
const SHF_COMPRESSED: u64 = 0x800;
const STT_FUNC: u8 = 2;
const STT_GNU_IFUNC: u8 = 10;
const SHN_XINDEX: u16 = 0xffff;

/// A whole file mapped read-only and private, once per path. Never unmapped: the symbolizer's
/// maps live as long as the process (its frames point into them), and a `&'static` slice is
/// what the DWARF reader borrows.
pub(crate) fn map(path: &str) -> Result<&'static [u8], String> {
    static MAPS: std::sync::Mutex<Vec<(String, &'static [u8])>> = std::sync::Mutex::new(Vec::new());
    let mut maps = MAPS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, data)) = maps.iter().find(|(p, _)| p == path) {
        return Ok(data);
    }
    let data = map_new(path)?;
    maps.push((path.to_string(), data));
    Ok(data)
}

fn map_new(path: &str) -> Result<&'static [u8], String> {
    let file = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let len = file.metadata().map_err(|e| format!("{path}: {e}"))?.len();
    let len = usize::try_from(len).map_err(|_| format!("{path}: too large"))?;
    if len == 0 {
        return Err(format!("{path}: empty"));
    }
    // SAFETY: a fresh read-only private mapping of an open file; the kernel picks the address.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(format!("{path}: mmap: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `len` bytes at `at` are mapped readable and never unmapped. (A file truncated
    // under the map would fault on access: these are the process's own loaded modules, which
    // the loader and the package manager replace, never truncate in place.)
    Ok(unsafe { std::slice::from_raw_parts(at.cast::<u8>(), len) })
}

/// The file name the loader gives a loaded object (`""` for the executable).
pub(crate) fn object_name(info: &libc::dl_phdr_info) -> String {
    if info.dlpi_name.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null dlpi_name is a NUL-terminated string, alive for the callback.
        unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }
            .to_string_lossy()
            .into_owned()
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// One section header.
#[derive(Debug, Clone, Copy)]
struct Section {
    name: u32,
    kind: u32,
    flags: u64,
    offset: u64,
    size: u64,
    link: u32,
    entsize: u64,
}

/// A parsed ELF64 little-endian file.
#[derive(Debug)]
pub(crate) struct Elf<'a> {
    data: &'a [u8],
    sections: Vec<Section>,
    names: &'a [u8],
}

impl<'a> Elf<'a> {
    /// Reads the section headers of `data`.
    pub(crate) fn parse(data: &'a [u8]) -> Result<Elf<'a>, String> {
        let bad = |what: &str| format!("not an ELF64 little-endian file ({what})");
        if data.get(..4) != Some(b"\x7fELF".as_slice()) {
            return Err(bad("magic"));
        }
        if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
            return Err(bad("class or byte order"));
        }
        let shoff = u64_at(data, 0x28).ok_or_else(|| bad("header"))?;
        let shentsize = usize::from(u16_at(data, 0x3a).ok_or_else(|| bad("header"))?);
        let shnum = u16_at(data, 0x3c).ok_or_else(|| bad("header"))?;
        let shstrndx = u16_at(data, 0x3e).ok_or_else(|| bad("header"))?;
        if shoff == 0 {
            return Err("the file has no section headers".into());
        }
        if shentsize < 64 {
            return Err(bad("section header size"));
        }
        let shoff = usize::try_from(shoff).map_err(|_| bad("section offset"))?;
        let header = |i: usize| -> Option<Section> {
            let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
            Some(Section {
                name: u32_at(data, at)?,
                kind: u32_at(data, at + 4)?,
                flags: u64_at(data, at + 8)?,
                offset: u64_at(data, at + 24)?,
                size: u64_at(data, at + 32)?,
                link: u32_at(data, at + 40)?,
                entsize: u64_at(data, at + 56)?,
            })
        };
        let first = header(0).ok_or_else(|| bad("section headers"))?;
        // Past 0xff00 sections the count and the names' index live in the first header.
        let count = match shnum {
            0 => usize::try_from(first.size).map_err(|_| bad("section count"))?,
            n => usize::from(n),
        };
        // At most what fits in the file: a bogus count cannot make a huge allocation.
        let count = count.min(data.len().saturating_sub(shoff) / shentsize);
        let sections: Vec<Section> = (0..count).map_while(header).collect();
        let names_at = match shstrndx {
            SHN_XINDEX => first.link as usize,
            n => usize::from(n),
        };
        let names = sections
            .get(names_at)
            .and_then(|s| slice(data, s))
            .unwrap_or(&[]);
        Ok(Elf {
            data,
            sections,
            names,
        })
    }

    /// The contents of the section called `name`, if the file holds it uncompressed (debug
    /// info compressed with `-gz` is not read: frames then have names, no `file:line`).
    pub(crate) fn section(&self, name: &str) -> Option<&'a [u8]> {
        self.sections
            .iter()
            .find(|s| self.name_of(s) == Some(name.as_bytes()))
            .filter(|s| s.flags & SHF_COMPRESSED == 0)
            .and_then(|s| slice(self.data, s))
    }

    fn name_of(&self, s: &Section) -> Option<&'a [u8]> {
        let rest = self.names.get(s.name as usize..)?;
        Some(&rest[..rest.iter().position(|&b| b == 0)?])
    }

    /// Calls `each(name, value, size)` for every function in the symbol table (`.symtab`), or
    /// where the file has none (a stripped library), in the dynamic one (`.dynsym`). `name` is
    /// the raw (mangled) bytes. Returns whether `.symtab` was the one read.
    pub(crate) fn functions(&self, each: &mut dyn FnMut(&'a [u8], u64, u64)) -> bool {
        let table = |kind: u32| self.sections.iter().find(|s| s.kind == kind);
        let (symtab, full) = match table(SHT_SYMTAB) {
            Some(s) => (s, true),
            None => match table(SHT_DYNSYM) {
                Some(s) => (s, false),
                None => return false,
            },
        };
        let Some(strings) = self
            .sections
            .get(symtab.link as usize)
            .and_then(|s| slice(self.data, s))
        else {
            return full;
        };
        let Some(syms) = slice(self.data, symtab) else {
            return full;
        };
        let Ok(entsize) = usize::try_from(symtab.entsize) else {
            return full;
        };
        if entsize < 24 {
            return full;
        }
        for sym in syms.chunks_exact(entsize) {
            let kind = sym[4] & 0xf;
            if kind != STT_FUNC && kind != STT_GNU_IFUNC {
                continue;
            }
            let (Some(name_at), Some(value), Some(size)) =
                (u32_at(sym, 0), u64_at(sym, 8), u64_at(sym, 16))
            else {
                continue;
            };
            if value == 0 {
                continue; // undefined (imported)
            }
            let Some(rest) = strings.get(name_at as usize..) else {
                continue;
            };
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            if end > 0 {
                each(&rest[..end], value, size);
            }
        }
        full
    }
}

/// A section's bytes in the file (`None` for one with no file contents, or out of bounds).
fn slice<'a>(data: &'a [u8], s: &Section) -> Option<&'a [u8]> {
    if s.kind == SHT_NOBITS {
        return None;
    }
    let start = usize::try_from(s.offset).ok()?;
    let end = start.checked_add(usize::try_from(s.size).ok()?)?;
    data.get(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn a_function_in_the_symbol_table() -> usize {
        std::hint::black_box(7)
    }

    #[test]
    fn this_test_binary_is_read_and_its_functions_found() {
        let data = map("/proc/self/exe").expect("maps its own executable");
        let elf = Elf::parse(data).expect("parses");
        assert!(elf.section(".text").is_some_and(|t| !t.is_empty()));
        assert!(elf.section(".no-such-section").is_none());
        let mut found = false;
        let full = elf.functions(&mut |name, _value, size| {
            let name = String::from_utf8_lossy(name);
            if name.contains("a_function_in_the_symbol_table") {
                found = size > 0;
            }
        });
        assert!(full, "a test binary keeps its .symtab");
        assert!(found);
        assert_eq!(a_function_in_the_symbol_table(), 7);
    }

    #[test]
    fn a_bad_or_cut_file_is_an_error_or_fewer_symbols_never_a_panic() {
        assert!(Elf::parse(b"").is_err());
        assert!(Elf::parse(b"MZ\x90\x00 not elf").is_err());
        assert!(Elf::parse(b"\x7fELF\x01\x01").is_err(), "32-bit");
        let data = map("/proc/self/exe").unwrap();
        // Every cut of the header, and cuts through the section headers at the end.
        for len in (0..256).chain((data.len() - 4096..data.len()).step_by(61)) {
            if let Ok(elf) = Elf::parse(&data[..len]) {
                let _ = elf.section(".text");
                elf.functions(&mut |_, _, _| {});
            }
        }
        // A header whose section count is a lie: bounded by the file's size.
        let mut lie = data[..4096].to_vec();
        lie[0x3c] = 0xff;
        lie[0x3d] = 0xfe;
        if let Ok(elf) = Elf::parse(&lie) {
            assert!(elf.sections.len() <= 4096 / 64);
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = map("/nonexistent/loopwatch-test").unwrap_err();
        assert!(err.contains("/nonexistent/loopwatch-test"), "{err}");
    }
}
