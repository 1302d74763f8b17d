//! Stacks of threads asleep in a system call, taken without a signal (Linux, x86_64).
//!
//! A signal would interrupt the call (Linux does not restart a socket call with a timeout,
//! `poll` or `nanosleep` after a handler), so for a thread asleep in one, the watchdog unwinds
//! its stack itself: `/proc/self/task/<tid>/syscall` gives the stack and instruction pointers
//! the thread sleeps at (its frame pointer is guessed from the stack, see [`Blocked::unwind`]);
//! the DWARF CFI (`.eh_frame`, indexed by `.eh_frame_hdr`) of this
//! process's own modules, found with `dl_iterate_phdr`, says where each frame's return address
//! is; the thread's stack is read through `/proc/self/mem`, which fails instead of faulting on an
//! address that is not mapped; and the frames are kept only if the thread is still asleep in the
//! same call at the same stack pointer afterwards (else it moved while being read).
//!
//! The unwind tables are copied when the unwinder is built, at the first stall that needs it,
//! so a module unloaded later cannot leave a dangling slice; modules loaded after that are not
//! known (their frames end the stack early).

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::proc::{read_asleep, Asleep};
use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, MayAllocateDuringUnwind, Module, Unwinder,
};

/// The most of a thread's stack read, from its stack pointer up.
const STACK_WINDOW: usize = 256 * 1024;
/// Frames kept, at most (as many as a signal capture keeps).
const MAX_FRAMES: usize = super::ports::MAX_FRAMES;

/// The unwinder of this process's modules, built once.
pub(crate) struct Blocked {
    unwinder: UnwinderX86_64<Vec<u8>, MayAllocateDuringUnwind>,
    /// The modules' code, to tell a return address from other words on a stack.
    text: Vec<std::ops::Range<u64>>,
    cache: CacheX86_64<MayAllocateDuringUnwind>,
    mem: File,
    window: Vec<u8>,
}

impl std::fmt::Debug for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocked").finish_non_exhaustive()
    }
}

impl Blocked {
    /// Finds this process's modules and copies their unwind tables; `None` where
    /// `/proc/self/mem` cannot be opened.
    pub(crate) fn new() -> Option<Blocked> {
        let mem = File::open("/proc/self/mem").ok()?;
        let mut unwinder = UnwinderX86_64::new();
        let mut text = Vec::new();
        for m in modules() {
            text.push(m.avma_range());
            unwinder.add_module(m);
        }
        Some(Blocked {
            unwinder,
            text,
            cache: CacheX86_64::new(),
            mem,
            window: vec![0; STACK_WINDOW],
        })
    }

    /// The return addresses of thread `tid`, asleep in a system call: innermost first (the
    /// call's own instruction first), as a signal capture gives them. `None` if the thread is
    /// not asleep, or moved while its stack was read.
    pub(crate) fn unwind(&mut self, tid: u64) -> Option<Vec<usize>> {
        let at = read_asleep(tid)?;
        let n = self.read_window(at.sp);
        let window = &self.window[..n];
        // The frame pointer is not in the syscall file, and code built with frame pointers
        // (Rust's std is) finds its frame through it. The C library's syscall wrappers leave it
        // as their caller set it: a word on the stack that holds the previous frame pointer (0,
        // or an address further up) next to a return address into known code. Each such word is
        // tried (and 0), and the longest stack wins: a wrong guess ends the walk at once.
        let word = |off: usize| -> Option<u64> {
            Some(u64::from_ne_bytes(
                window.get(off..off + 8)?.try_into().ok()?,
            ))
        };
        let in_code = |a: u64| self.text.iter().any(|t| t.contains(&a));
        let top = at.sp + n as u64;
        let mut guesses = vec![0u64];
        let mut off = 0;
        while off + 16 <= n.min(64 * 1024) && guesses.len() < 9 {
            let (prev, ret) = (word(off), word(off + 8));
            let slot = at.sp + off as u64;
            if let (Some(prev), Some(ret)) = (prev, ret) {
                if in_code(ret) && (prev == 0 || (prev > slot && prev < top)) {
                    guesses.push(slot);
                }
            }
            off += 8;
        }
        let mut best: Vec<usize> = Vec::new();
        for bp in guesses {
            let ips = self.walk(at, bp, n);
            if ips.len() > best.len() {
                best = ips;
            }
        }
        // Still asleep in the same call at the same place: the stack read is the one it sleeps
        // on.
        (read_asleep(tid) == Some(at) && !best.is_empty()).then_some(best)
    }

    /// One walk from where the thread sleeps, with `bp` as its frame pointer.
    fn walk(&mut self, at: Asleep, bp: u64, n: usize) -> Vec<usize> {
        let (window, sp) = (&self.window[..n], at.sp);
        let mut read = |addr: u64| -> Result<u64, ()> {
            let off = usize::try_from(addr.checked_sub(sp).ok_or(())?).map_err(|_| ())?;
            let bytes = window.get(off..off.checked_add(8).ok_or(())?).ok_or(())?;
            Ok(u64::from_ne_bytes(bytes.try_into().map_err(|_| ())?))
        };
        let regs = UnwindRegsX86_64::new(at.pc, at.sp, bp);
        let mut frames = self
            .unwinder
            .iter_frames(at.pc, regs, &mut self.cache, &mut read);
        let mut ips = Vec::new();
        while let Ok(Some(f)) = frames.next() {
            let ip = match f {
                FrameAddress::InstructionPointer(ip) => ip,
                FrameAddress::ReturnAddress(ra) => ra.get(),
            };
            let Ok(ip) = usize::try_from(ip) else { break };
            ips.push(ip);
            if ips.len() >= MAX_FRAMES {
                break;
            }
        }
        ips
    }

    /// Reads up to [`STACK_WINDOW`] bytes of this process's memory from `sp` into the window;
    /// the bytes read (a read stops where the mapping does).
    fn read_window(&mut self, sp: u64) -> usize {
        let mut got = 0;
        while got < self.window.len() {
            match self.mem.read_at(&mut self.window[got..], sp + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        got
    }
}

/// This process's loaded modules with their unwind tables (copied).
fn modules() -> Vec<Module<Vec<u8>>> {
    let mut out: Vec<Module<Vec<u8>>> = Vec::new();
    // SAFETY: dl_iterate_phdr calls `each` with valid `dl_phdr_info` for every loaded object,
    // under the loader's lock; `each` only reads the program headers and the mapped memory
    // they describe, and copies what it keeps.
    unsafe {
        libc::dl_iterate_phdr(Some(each), (&mut out as *mut Vec<Module<Vec<u8>>>).cast());
    }
    out
}

unsafe extern "C" fn each(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `Vec` `modules` passed; `info` is valid for this call.
    let (out, info) = unsafe { (&mut *data.cast::<Vec<Module<Vec<u8>>>>(), &*info) };
    if let Some(m) = std::panic::catch_unwind(|| module(info)).ok().flatten() {
        out.push(m);
    }
    0
}

/// One loaded object as a framehop module: its executable range, and its `.eh_frame_hdr` and
/// `.eh_frame`, copied.
fn module(info: &libc::dl_phdr_info) -> Option<Module<Vec<u8>>> {
    let bias = info.dlpi_addr;
    // SAFETY: dlpi_phdr points to dlpi_phnum program headers of the object.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
    let mut text: Option<std::ops::Range<u64>> = None;
    let mut hdr: Option<std::ops::Range<u64>> = None;
    for p in phdrs {
        let range = p.p_vaddr..p.p_vaddr + p.p_memsz;
        match p.p_type {
            libc::PT_LOAD if p.p_flags & libc::PF_X != 0 => {
                text = Some(match text {
                    Some(t) => t.start.min(range.start)..t.end.max(range.end),
                    None => range,
                });
            }
            libc::PT_GNU_EH_FRAME => hdr = Some(range),
            _ => {}
        }
    }
    let (text, hdr) = (text?, hdr?);
    // SAFETY: the header segment is mapped (it is part of a loaded object's PT_LOAD).
    let hdr_bytes = unsafe { copy(bias + hdr.start, hdr.end - hdr.start) };
    let eh_frame = eh_frame_start(&hdr_bytes, hdr.start)?;
    // .eh_frame runs to the end of the PT_LOAD segment that holds it, at most.
    let seg_end = phdrs
        .iter()
        .filter(|p| p.p_type == libc::PT_LOAD)
        .map(|p| p.p_vaddr..p.p_vaddr + p.p_filesz)
        .find(|r| r.contains(&eh_frame))?
        .end;
    // SAFETY: [eh_frame, seg_end) lies inside a mapped PT_LOAD segment of the object.
    let eh_bytes = unsafe { copy(bias + eh_frame, seg_end - eh_frame) };
    let name = super::elf::object_name(info);
    Some(Module::new(
        name,
        bias + text.start..bias + text.end,
        bias,
        ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: Some(text),
            eh_frame_svma: Some(eh_frame..seg_end),
            eh_frame: Some(eh_bytes),
            eh_frame_hdr_svma: Some(hdr),
            eh_frame_hdr: Some(hdr_bytes),
            ..Default::default()
        },
    ))
}

/// Copies `len` bytes of this process's memory at `addr`.
///
/// # Safety
/// `[addr, addr + len)` must be mapped and readable.
unsafe fn copy(addr: u64, len: u64) -> Vec<u8> {
    // SAFETY: as the caller promises.
    unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len as usize) }.to_vec()
}

/// The file address of `.eh_frame`, from its header at file address `hdr_svma`: the header's
/// `eh_frame_ptr`, in the pointer encoding it names (absolute or relative to itself).
fn eh_frame_start(hdr: &[u8], hdr_svma: u64) -> Option<u64> {
    const PCREL: u8 = 0x10;
    let (&version, &enc) = (hdr.first()?, hdr.get(1)?);
    if version != 1 {
        return None;
    }
    let field = 4u64; // the pointer starts after four one-byte fields
    let at = usize::try_from(field).ok()?;
    let value: i64 = match enc & 0x0f {
        0x03 => i64::from(u32::from_le_bytes(hdr.get(at..at + 4)?.try_into().ok()?)), // udata4
        0x0b => i64::from(i32::from_le_bytes(hdr.get(at..at + 4)?.try_into().ok()?)), // sdata4
        0x04 | 0x0c => i64::from_le_bytes(hdr.get(at..at + 8)?.try_into().ok()?),     // (u|s)data8
        _ => return None,
    };
    let base = match enc & 0x70 {
        0 => 0,
        PCREL => hdr_svma.checked_add(field)?,
        _ => return None,
    };
    base.checked_add_signed(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn the_header_points_at_eh_frame() {
        // version 1, pcrel|sdata4, then the pointer: 0x100 past the field at svma 0x1000 + 4.
        let hdr = [1, 0x1b, 0x03, 0x3b, 0x00, 0x01, 0x00, 0x00];
        assert_eq!(eh_frame_start(&hdr, 0x1000), Some(0x1104));
        assert_eq!(eh_frame_start(&[2, 0x1b, 0, 0, 0, 0, 0, 0], 0), None);
    }

    #[inline(never)]
    fn sleep_here_for_the_unwinder(stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_sleeping_thread_is_unwound_to_its_own_function_without_a_signal() {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            sleep_here_for_the_unwinder(&s2);
        });
        let tid = u64::try_from(rx.recv().unwrap()).unwrap();
        let mut b = Blocked::new().expect("/proc/self/mem opens");
        let mut ips = None;
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(5));
            ips = b.unwind(tid);
            if ips.is_some() {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        let ips = ips.expect("unwound while it slept");
        let names: Vec<String> = super::super::symbolize::resolve(&ips, false)
            .into_iter()
            .filter_map(|f| f.function)
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("sleep_here_for_the_unwinder")),
            "{names:#?}"
        );
    }
}
