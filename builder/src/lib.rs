//! ncimage: builds per-role, LUKS2-encrypted Debian 13 images for a Nextcloud cluster and
//! proves them under QEMU. One module per concern; the CLI (main.rs) only parses and dispatches.
//! See ARCHITECTURE.md for the map.

pub mod archive;
pub mod build;
pub mod cloud;
pub mod cluster;
pub mod disk;
pub mod error;
pub mod export;
pub mod fat;
pub mod firstboot;
pub mod fs;
pub mod inspect;
pub mod interrupt;
pub mod join;
pub mod lab;
pub mod layer;
pub mod luks;
pub mod overlay;
pub mod progress;
pub mod qemu;
pub mod rekey;
pub mod render;
pub mod rootfs;
pub mod secrets;
pub mod seed;
pub mod spec;
pub mod template;
pub mod tools;
pub mod upload;
pub mod validate;
pub mod vmtest;
pub mod volume;

pub use error::{Error, Result};
