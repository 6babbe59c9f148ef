//! libagentd_region.so: the C ABI of agentd regions (include/agentd_region.h), so an
//! agent in any language can open a region. A crate of its own: a cdylib in the crate
//! that agentd links would be built twice by `cargo test` (with and without unwinding)
//! under one file name.

use agentd_region::Region;
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_error(text: String) {
    let c = CString::new(text.replace('\0', " ")).expect("no NUL left");
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(c));
}

/// Opens region `name` (read-only unless `writable`). NULL on failure; then
/// `agentd_region_last_error()` says why.
///
/// # Safety
/// `name` must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn agentd_region_open(name: *const c_char, writable: c_int) -> *mut Region {
    if name.is_null() {
        set_error("agentd_region_open: name is NULL".into());
        return std::ptr::null_mut();
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let name = match unsafe { CStr::from_ptr(name) }.to_str() {
        Ok(n) => n,
        Err(_) => {
            set_error("agentd_region_open: name is not UTF-8".into());
            return std::ptr::null_mut();
        }
    };
    match Region::open(name, writable != 0) {
        Ok(r) => Box::into_raw(Box::new(r)),
        Err(e) => {
            set_error(format!("region {name}: {e}"));
            std::ptr::null_mut()
        }
    }
}

/// The text of this thread's last failed call, or NULL.
#[unsafe(no_mangle)]
pub extern "C" fn agentd_region_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
}

/// # Safety
/// `r` must come from `agentd_region_open` and not be closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn agentd_region_data(r: *const Region) -> *const c_void {
    // SAFETY: per the contract above.
    unsafe { (*r).as_ptr().cast() }
}

/// # Safety
/// As `agentd_region_data`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn agentd_region_size(r: *const Region) -> u64 {
    // SAFETY: per the contract above.
    unsafe { (*r).len() }
}

/// # Safety
/// As `agentd_region_data`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn agentd_region_generation(r: *const Region) -> u64 {
    // SAFETY: per the contract above.
    unsafe { (*r).generation() }
}

/// The last failure the broker announced for this handle (copied into this thread's
/// error text), or NULL.
///
/// # Safety
/// As `agentd_region_data`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn agentd_region_failure(r: *const Region) -> *const c_char {
    // SAFETY: per the contract above.
    match unsafe { (*r).failure() } {
        Some(text) => {
            set_error(text);
            agentd_region_last_error()
        }
        None => std::ptr::null(),
    }
}

/// Unmaps and closes the handle (a writable region's writes are kept by the broker).
///
/// # Safety
/// `r` must come from `agentd_region_open`; it is invalid afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn agentd_region_close(r: *mut Region) {
    if !r.is_null() {
        // SAFETY: per the contract above, `r` is a Box this library made.
        drop(unsafe { Box::from_raw(r) });
    }
}
