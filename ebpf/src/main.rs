//! The object the agent loads: weir's programs, one file per attach point (`programs/`), over
//! the shared logic of the `weir_ebpf` library.
#![no_std]
#![no_main]

mod programs;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
