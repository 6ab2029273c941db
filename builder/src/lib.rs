//! ncimage: builds per-role, LUKS2-encrypted Debian 13 images for a Nextcloud cluster and
//! proves them under QEMU. One module per concern; the CLI (main.rs) only parses and dispatches.

pub mod error;
pub mod tools;

pub use error::{Error, Result};
