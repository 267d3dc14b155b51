//! What the eBPF object needs from the running kernel before it is loaded, and the object as
//! it is then loaded. Each fact has a fallback: the programs work without it, at the cost of
//! a helper call per packet.
//!
//! - Where `skb->ip_summed` is (the kernel's BTF, `/sys/kernel/btf/vmlinux`). The per-packet
//!   path reads it to update L4 checksums without a helper call (`ebpf/src/nat.rs`). For that
//!   it calls the kfunc `bpf_cast_to_kern_ctx` and reads one byte of `struct sk_buff`. aya
//!   links no kfunc calls, so the object calls a helper number no helper has
//!   (`kernel_facts::CAST_TO_KERN_CTX_CALL`) and the call is made the kfunc's here, with the
//!   kfunc's BTF id; where `ip_summed` sits goes into the object's global
//!   `kernel_facts::IP_SUMMED`.
//! - The jiffies clock: the programs keep time as the coarse monotonic clock
//!   (`CLOCK_MONOTONIC_COARSE`, which user space reads too). `bpf_jiffies64`, which the
//!   verifier inlines, gives it as jiffies × the tick + a fixed offset, where
//!   `bpf_ktime_get_coarse_ns` is a helper call; both advance at the tick, as the kernel
//!   updates jiffies from the monotonic clock. The tick is the coarse clock's resolution; the
//!   offset comes from `/proc/timer_list`, which gives the monotonic time and jiffies together.
use std::sync::OnceLock;

use crate::error::{fail, Context, Result};
use btf_rs::{Btf, Type};
use object::{read::elf::ElfFile64, Object, ObjectSection, SectionFlags};
use weir_common::kernel_facts::CAST_TO_KERN_CTX_CALL;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const KFUNC: &str = "bpf_cast_to_kern_ctx";
const TIMER_LIST: &str = "/proc/timer_list";

/// What the loader found about the running kernel; `None` where it did not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub skb: Option<SkbLayout>,
    pub jiffies: Option<JiffiesClock>,
}

/// From the kernel's BTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkbLayout {
    /// The BTF id of `bpf_cast_to_kern_ctx`.
    pub cast_to_kern_ctx: u32,
    /// The bit offset of `ip_summed` (2 bits) in `struct sk_buff`.
    pub ip_summed_bit: u32,
}

/// The coarse monotonic clock as jiffies × `ns_per_jiffy` + `offset_ns` (wrapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffiesClock {
    pub ns_per_jiffy: u64,
    pub offset_ns: u64,
}

/// The running kernel's facts, read once per process; what is missing is logged once, with
/// why.
pub fn facts() -> Facts {
    static FACTS: OnceLock<Facts> = OnceLock::new();
    *FACTS.get_or_init(|| Facts {
        skb: read_skb_layout()
            .inspect_err(|e| {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "L4 checksums of translated packets are updated by helper calls"
                )
            })
            .ok(),
        jiffies: read_jiffies_clock()
            .inspect_err(|e| {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the programs read the clock with a helper call"
                )
            })
            .ok(),
    })
}

fn read_skb_layout() -> Result<SkbLayout> {
    let btf =
        Btf::from_file(VMLINUX).with_context(|| format!("read the kernel's BTF {VMLINUX}"))?;
    let cast_to_kern_ctx = btf
        .resolve_ids_by_name(KFUNC)
        .unwrap_or_default()
        .into_iter()
        .find(|id| matches!(btf.resolve_type_by_id(*id), Ok(Type::Func(_))))
        .with_context(|| format!("{VMLINUX}: no function {KFUNC} (kernel before 6.2?)"))?;
    let skb = btf
        .resolve_types_by_name("sk_buff")
        .unwrap_or_default()
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .with_context(|| format!("{VMLINUX}: no struct sk_buff"))?;
    let (bit, size) = member_bits(&btf, &skb, "ip_summed", 0)
        .with_context(|| format!("{VMLINUX}: struct sk_buff has no member ip_summed"))?;
    if size != Some(2) || bit % 8 + 2 > 8 {
        fail!("{VMLINUX}: sk_buff.ip_summed at bit {bit}, {size:?} bits: not a 2-bit field within one byte");
    }
    Ok(SkbLayout {
        cast_to_kern_ctx,
        ip_summed_bit: bit,
    })
}

/// Now on the clock the programs keep time on (conntrack lifetimes, affinity, the DNS lease),
/// as user space reads it: the coarse monotonic clock, in ns.
pub fn clock_ns() -> Result<u64> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(ns)
        .context("read the coarse monotonic clock")
}

/// That clock's resolution: the kernel's tick, in ns.
pub fn tick_ns() -> Result<u64> {
    nix::time::clock_getres(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(ns)
        .context("the coarse monotonic clock's resolution")
}

fn ns(t: nix::sys::time::TimeSpec) -> u64 {
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn read_jiffies_clock() -> Result<JiffiesClock> {
    let tick = tick_ns()?;
    // HZ from 24 to 10 000.
    if !(100_000..=41_666_667).contains(&tick) {
        fail!("the coarse monotonic clock's resolution is {tick} ns: not a kernel tick");
    }
    let text = std::fs::read_to_string(TIMER_LIST).with_context(|| format!("read {TIMER_LIST}"))?;
    let (now, jiffies) = timer_list_now(&text)
        .with_context(|| format!("{TIMER_LIST}: no \"now at N nsecs\" and \"jiffies: N\" lines"))?;
    Ok(JiffiesClock {
        ns_per_jiffy: tick,
        offset_ns: now.wrapping_sub(jiffies.wrapping_mul(tick)),
    })
}

/// The monotonic time and jiffies `/proc/timer_list` gives: its first `now at N nsecs` line
/// and its first `jiffies: N` line.
fn timer_list_now(text: &str) -> Option<(u64, u64)> {
    let now = text.lines().find_map(|l| {
        l.strip_prefix("now at ")?
            .strip_suffix(" nsecs")?
            .parse()
            .ok()
    })?;
    let jiffies = text
        .lines()
        .find_map(|l| l.strip_prefix("jiffies: ")?.trim().parse().ok())?;
    Some((now, jiffies))
}

/// The bit offset and bitfield size of member `name` of a struct, looked for in its anonymous
/// structs and unions as well (`sk_buff` nests its fields in several).
fn member_bits(btf: &Btf, s: &btf_rs::Struct, name: &str, base: u32) -> Option<(u32, Option<u32>)> {
    for m in &s.members {
        let at = base + m.bit_offset();
        let mname = btf.resolve_name(m).unwrap_or_default();
        if mname == name {
            return Some((at, m.bitfield_size()));
        }
        if mname.is_empty() {
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m) {
                if let Some(found) = member_bits(btf, &inner, name, at) {
                    return Some(found);
                }
            }
        }
    }
    None
}

/// The object's bytes, 8-aligned for the ELF parser.
pub struct ObjectBytes(Vec<u64>, usize);

impl ObjectBytes {
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the vector holds at least `self.1` initialized bytes.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.1) }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, self.1) }
    }
}

/// The object with each call to `CAST_TO_KERN_CTX_CALL` in its code sections made a call to
/// the kfunc `id` (`src_reg` = BPF_PSEUDO_KFUNC_CALL, the kfunc's BTF id in vmlinux), and how
/// many calls that was.
pub fn with_kfunc_calls(object: &[u8], id: u32) -> Result<(ObjectBytes, usize)> {
    let mut out = ObjectBytes(vec![0u64; object.len().div_ceil(8)], object.len());
    out.as_bytes_mut().copy_from_slice(object);
    let mut code = Vec::new();
    {
        let elf = ElfFile64::<object::Endianness>::parse(out.as_bytes())
            .context("parse the eBPF object")?;
        for section in elf.sections() {
            let SectionFlags::Elf { sh_flags } = section.flags() else {
                continue;
            };
            if sh_flags & u64::from(object::elf::SHF_EXECINSTR) == 0 {
                continue;
            }
            if let Some((off, len)) = section.file_range() {
                code.push((off as usize, len as usize));
            }
        }
    }
    const BPF_CALL: u8 = 0x85;
    const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
    let bytes = out.as_bytes_mut();
    let mut patched = 0;
    for (off, len) in code {
        let section = bytes
            .get_mut(off..off.saturating_add(len))
            .context("the eBPF object: a code section past its end")?;
        for insn in section.chunks_exact_mut(8) {
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            if insn[0] == BPF_CALL && insn[1] == 0 && imm == CAST_TO_KERN_CTX_CALL {
                insn[1] = BPF_PSEUDO_KFUNC_CALL << 4;
                insn[4..8].copy_from_slice(&(id as i32).to_le_bytes());
                patched += 1;
            }
        }
    }
    Ok((out, patched))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The call the object makes, found and made the kfunc call; nothing else touched.
    #[test]
    fn the_objects_kfunc_calls_are_linked_to_the_kernels_id() {
        let object = super::super::object::OBJECT;
        assert!(
            !object.is_empty(),
            "built with AYA_BUILD_SKIP=1: no object to check"
        );
        let (linked, n) = with_kfunc_calls(object, 4242).unwrap();
        assert!(n > 0, "no call to {CAST_TO_KERN_CTX_CALL:#x} in the object");
        let (a, b) = (object, linked.as_bytes());
        assert_eq!(a.len(), b.len());
        let changed: Vec<usize> = (0..a.len()).filter(|i| a[*i] != b[*i]).collect();
        // Per call: the register byte and up to 4 bytes of the immediate.
        assert!(
            changed.len() <= n * 5,
            "{} bytes changed for {n} calls",
            changed.len()
        );
        let (again, none) = with_kfunc_calls(b, 4242).unwrap();
        assert_eq!(none, 0);
        assert_eq!(again.as_bytes(), b);
    }

    /// This machine's kernel has the BTF facts (the test machines run 6.18 with BTF).
    #[test]
    fn the_running_kernel_has_the_kfunc_and_ip_summed() {
        let f = read_skb_layout().unwrap();
        assert!(f.cast_to_kern_ctx > 0);
        assert!(f.ip_summed_bit > 0 && f.ip_summed_bit < 224 * 8);
    }

    #[test]
    fn timer_list_gives_now_and_jiffies() {
        let text = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 24526869536842 nsecs\n\ncpu: 0\n  .last_jiffies   : 4301023945\njiffies: 4301024428\n\ncpu: 1\njiffies: 4301024429\n";
        assert_eq!(
            timer_list_now(text),
            Some((24_526_869_536_842, 4_301_024_428))
        );
        assert_eq!(timer_list_now("now at 5 nsecs\n"), None);
    }
}
