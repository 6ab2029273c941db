//! The raw GPT disk that boots under both SeaBIOS and OVMF.
//!
//! Layout (512-byte sectors, every partition aligned to 1 MiB, backup GPT in the last MiB):
//!
//! | # | name | type | content |
//! |---|------|------|---------|
//! | 1 | bios | EF02 BIOS boot | GRUB i386-pc core.img (boot.img sits in the protective MBR) |
//! | 2 | esp  | EF00 ESP       | FAT with only `/EFI/BOOT/BOOTX64.EFI` (GRUB x86_64-efi) |
//! | 3 | boot | 8300 Linux     | the caller's ext4 /boot image (`vmlinuz`, `initrd.img`, `grub/grub.cfg`) |
//! | 4 | root | 8309 LUKS      | the caller's LUKS2 file |
//!
//! Both GRUB images carry the same early config: find the boot file system by UUID and
//! read `/grub/grub.cfg` from it. Every module they need is built in, so nothing is loaded
//! from disk. BIOS boot is installed the way `grub-bios-setup` does for an embedded core
//! image, without needing a block device: boot.img in the MBR points at the first sector of
//! the bios partition, and the block list in core.img's first sector (diskboot.img) points
//! at the rest of core.img.
//!
//! Assembly copies partition contents with SEEK_DATA/SEEK_HOLE so holes stay holes, and
//! the same inputs (including the seed) always give the same bytes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::tools;

pub const SECTOR: u64 = 512;
/// Partition alignment and the room kept at both ends of the disk: 1 MiB.
pub const ALIGN: u64 = 1 << 20;
pub const ALIGN_LBA: u64 = ALIGN / SECTOR;
/// Size of the BIOS boot partition.
pub const BIOS_BYTES: u64 = 1 << 20;
/// Default size of the EFI system partition.
pub const DEFAULT_ESP_BYTES: u64 = 32 << 20;
/// Sectors a GPT takes at either end besides the MBR: header + 128 entries of 128 bytes.
pub const GPT_SECTORS: u64 = 1 + 32;

pub const TYPE_BIOS: &str = "21686148-6449-6E6F-744E-656564454649";
pub const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const TYPE_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
pub const TYPE_LUKS: &str = "CA7D7CCB-63ED-4C53-861C-1742536059CC";

pub const GRUB_PC_DIR: &str = "/usr/lib/grub/i386-pc";
pub const GRUB_EFI_DIR: &str = "/usr/lib/grub/x86_64-efi";

/// Modules built into both GRUB images (nothing is loaded from disk at boot).
#[rustfmt::skip]
pub const GRUB_MODULES_COMMON: &[&str] = &[
    "part_gpt", "part_msdos", "ext2", "fat", "normal", "linux", "boot", "search", "search_fs_uuid",
    "search_label", "configfile", "echo", "test", "gzio", "xzio", "serial", "terminal", "terminfo",
    "sleep", "all_video", "gfxterm", "cat", "ls", "halt", "reboot",
];
/// Extra modules of the i386-pc core.img.
pub const GRUB_MODULES_PC: &[&str] = &["biosdisk"];
/// Extra modules of the x86_64-efi image.
pub const GRUB_MODULES_EFI: &[&str] = &["efi_gop", "efi_uga"];

/// boot.img: where the LBA of core.img's first sector goes (u64 LE; `kernel_sector`).
pub const BOOT_KERNEL_SECTOR: usize = 0x5c;
/// boot.img: the boot drive byte (0xff: use the drive the BIOS passed in DL).
pub const BOOT_DRIVE: usize = 0x64;
/// boot.img: the 2-byte `jmp` over the hard-disk check that grub-bios-setup replaces
/// with two NOPs for hard disks (works around BIOSes passing a wrong DL).
pub const BOOT_DRIVE_CHECK: usize = 0x66;
/// boot.img bytes from here on are the disk signature and the partition table: kept.
pub const MBR_CODE_END: usize = 0x1b8;
/// diskboot.img: the first (and here only) block list entry ends the first sector:
/// start u64, len u16, segment u16.
pub const BLOCKLIST_START: usize = 0x200 - 12;

#[derive(Debug, Clone)]
pub struct DiskInputs<'a> {
    /// ext4 image of /boot.
    pub boot_fs: &'a Path,
    /// UUID of that ext4 file system (GRUB finds it with `search --fs-uuid`).
    pub boot_fs_uuid: &'a str,
    /// The LUKS2 root file.
    pub root: &'a Path,
    /// Size of the ESP (rounded up to 1 MiB).
    pub esp_bytes: u64,
    /// Seeds the disk and partition GUIDs and the ESP volume id.
    pub seed: [u8; 32],
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DiskLayout {
    pub partitions: Vec<Partition>,
    pub size_bytes: u64,
    pub disk_guid: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub name: String,
    pub start_lba: u64,
    pub size_bytes: u64,
    pub type_guid: String,
    pub guid: String,
}

impl Partition {
    pub fn end_lba(&self) -> u64 {
        self.start_lba + self.size_bytes / SECTOR - 1
    }
    pub fn offset_bytes(&self) -> u64 {
        self.start_lba * SECTOR
    }
}

impl DiskLayout {
    pub fn partition(&self, name: &str) -> &Partition {
        self.partitions
            .iter()
            .find(|p| p.name == name)
            .expect("partition names are fixed")
    }

    /// Fills the disk and partition GUIDs from `seed`.
    pub fn with_guids(mut self, seed: &[u8; 32]) -> DiskLayout {
        self.disk_guid = derive_guid(seed, "disk");
        for p in &mut self.partitions {
            p.guid = derive_guid(seed, &format!("partition-{}", p.name));
        }
        self
    }
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// The partition table for a boot image of `boot_bytes`, a root of `root_bytes` and an
/// ESP of `esp_bytes` (each rounded up to 1 MiB). GUIDs are left empty (see
/// [`DiskLayout::with_guids`]).
pub fn layout(boot_bytes: u64, root_bytes: u64, esp_bytes: u64) -> DiskLayout {
    let parts = [
        ("bios", BIOS_BYTES, TYPE_BIOS),
        ("esp", round_up(esp_bytes.max(1), ALIGN), TYPE_ESP),
        ("boot", round_up(boot_bytes.max(1), ALIGN), TYPE_LINUX),
        ("root", round_up(root_bytes.max(1), ALIGN), TYPE_LUKS),
    ];
    let mut lba = ALIGN_LBA;
    let mut partitions = Vec::new();
    for (i, (name, size, ty)) in parts.into_iter().enumerate() {
        partitions.push(Partition {
            number: i as u32 + 1,
            name: name.to_string(),
            start_lba: lba,
            size_bytes: size,
            type_guid: ty.to_string(),
            guid: String::new(),
        });
        lba += size / SECTOR;
    }
    // One more MiB after the last partition holds the backup GPT (33 sectors).
    DiskLayout {
        partitions,
        size_bytes: (lba + ALIGN_LBA) * SECTOR,
        disk_guid: String::new(),
    }
}

/// A version-4-shaped GUID from sha256("ncimage-gpt" | label | seed), in sgdisk's
/// uppercase form.
pub fn derive_guid(seed: &[u8; 32], label: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"ncimage-gpt\0");
    h.update(label.as_bytes());
    h.update([0]);
    h.update(seed);
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode_upper(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// The FAT volume id of the ESP, from the seed.
pub fn esp_volume_id(seed: &[u8; 32]) -> u32 {
    let d = Sha256::new()
        .chain_update(b"ncimage-esp\0")
        .chain_update(seed)
        .finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// /grub/grub.cfg of the boot partition: serial console (115200, unit 0) and the normal
/// console, no menu delay, one entry booting `/vmlinuz` with `cmdline` and `/initrd.img`, plus
/// `/ncimage-enroll.img` while it exists (first boot: the enrollment key, which `ncimage rekey`
/// deletes). `cmdline` is written as is: GRUB's shell quoting applies to it.
pub fn grub_cfg(cmdline: &str) -> String {
    format!(
        "serial --unit=0 --speed=115200\n\
         terminal_input serial console\n\
         terminal_output serial console\n\
         set default=0\n\
         set timeout=0\n\
         set timeout_style=hidden\n\
         menuentry 'Debian GNU/Linux' {{\n\
         \techo 'Loading Linux ...'\n\
         \tlinux /vmlinuz {cmdline}\n\
         \techo 'Loading initial ramdisk ...'\n\
         \tif [ -f /ncimage-enroll.img ]; then\n\
         \t\tinitrd /initrd.img /ncimage-enroll.img\n\
         \telse\n\
         \t\tinitrd /initrd.img\n\
         \tfi\n\
         }}\n",
        cmdline = cmdline.trim()
    )
}

/// The config embedded in both GRUB images.
pub fn grub_early_cfg(boot_fs_uuid: &str) -> String {
    format!("search --no-floppy --fs-uuid --set=root {boot_fs_uuid}\nset prefix=($root)/grub\n")
}

fn check_uuid(uuid: &str) -> Result<()> {
    let ok = uuid.len() == 36
        && uuid.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            format!("boot file system UUID {uuid:?} is not a UUID"),
            "give the UUID the boot ext4 was made with (mke2fs -U), like 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        ))
    }
}

/// Builds a standalone GRUB image with `grub-mkimage`.
fn mkimage(
    format: &str,
    dir: &str,
    early_cfg: &Path,
    out: &Path,
    extra: &[&str],
) -> Result<Vec<u8>> {
    tools::require("grub-mkimage")?;
    if !Path::new(dir).join("moddep.lst").exists() {
        return Err(Error::MissingTool {
            tool: format!("GRUB {format} modules ({dir})"),
            package: if format == "i386-pc" {
                "grub-pc-bin"
            } else {
                "grub-efi-amd64-bin"
            }
            .to_string(),
        });
    }
    let mut cmd = Command::new("grub-mkimage");
    cmd.args(["-d", dir, "-O", format, "-p", "/grub", "-c"])
        .arg(early_cfg)
        .arg("-o")
        .arg(out)
        .args(GRUB_MODULES_COMMON)
        .args(extra);
    tools::run(&mut cmd)?;
    std::fs::read(out).map_err(Error::io("reading", out))
}

/// Installs boot.img into the first 440 bytes of `mbr` (the disk signature and partition
/// table at 440..512 are kept) pointing at `core_lba`, as grub-bios-setup does for a hard
/// disk.
pub fn patch_mbr(mbr: &mut [u8; 512], boot_img: &[u8], core_lba: u64) -> Result<()> {
    if boot_img.len() != 512 || boot_img[510..512] != [0x55, 0xaa] {
        return Err(Error::invalid(
            "GRUB's boot.img is not a 512-byte boot sector",
            format!("reinstall grub-pc-bin ({GRUB_PC_DIR}/boot.img)"),
        ));
    }
    if boot_img[BOOT_DRIVE_CHECK] != 0xeb {
        return Err(Error::invalid(
            format!("GRUB's boot.img has no jump at the drive check offset {BOOT_DRIVE_CHECK:#x}"),
            "this GRUB's boot.img layout is not the one ncimage knows (GRUB 2.x)",
        ));
    }
    mbr[..MBR_CODE_END].copy_from_slice(&boot_img[..MBR_CODE_END]);
    mbr[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    mbr[BOOT_DRIVE] = 0xff;
    mbr[BOOT_DRIVE_CHECK] = 0x90;
    mbr[BOOT_DRIVE_CHECK + 1] = 0x90;
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    Ok(())
}

/// Pads core.img to whole sectors and points its block list at the sectors after its first
/// one, which is written at `core_lba`. Returns the padded image.
pub fn patch_core(core: &[u8], core_lba: u64, max_bytes: u64) -> Result<Vec<u8>> {
    let sectors = (core.len() as u64).div_ceil(SECTOR);
    if core.len() < 2 * SECTOR as usize
        || sectors * SECTOR > max_bytes
        || sectors - 1 > u16::MAX as u64
    {
        return Err(Error::invalid(
            format!(
                "GRUB's core.img is {} bytes; the bios partition holds {max_bytes}",
                core.len()
            ),
            "build fewer modules into core.img",
        ));
    }
    let mut img = core.to_vec();
    img.resize((sectors * SECTOR) as usize, 0);
    let b = BLOCKLIST_START;
    // diskboot.img ships with the entry for a core at LBA 2 (segment 0x820); the entry
    // before it must stay a terminator (len 0).
    let segment = u16::from_le_bytes([img[b + 10], img[b + 11]]);
    if segment != 0x820 || img[b - 2..b] != [0, 0] {
        return Err(Error::invalid(
            "GRUB's core.img has no block list where diskboot.img keeps it",
            "this GRUB's diskboot.img layout is not the one ncimage knows (GRUB 2.x)",
        ));
    }
    img[b..b + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    img[b + 8..b + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
    Ok(img)
}

/// Copies `src` into `dst` at `offset`, skipping holes (SEEK_DATA/SEEK_HOLE) so they stay
/// holes in `dst`. Returns the number of data bytes copied.
pub fn copy_sparse(src_path: &Path, dst: &File, dst_path: &Path, offset: u64) -> Result<u64> {
    let src = File::open(src_path).map_err(Error::io("opening", src_path))?;
    let len = src
        .metadata()
        .map_err(Error::io("reading", src_path))?
        .len();
    let fd = src.as_raw_fd();
    let mut pos = 0u64;
    let mut copied = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    let mut use_cfr = true;
    while pos < len {
        // SAFETY: plain syscalls on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole is left
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if pos == 0 => {
                    // No hole support: the whole file is data.
                    copied += copy_range(
                        &src,
                        src_path,
                        dst,
                        dst_path,
                        0,
                        offset,
                        len,
                        &mut buf,
                        &mut use_cfr,
                    )?;
                    break;
                }
                _ => {
                    return Err(Error::Io {
                        action: "seeking data in",
                        path: src_path.into(),
                        source: e,
                    })
                }
            }
        }
        let data = data as u64;
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            len
        } else {
            (hole as u64).min(len)
        };
        copied += copy_range(
            &src,
            src_path,
            dst,
            dst_path,
            data,
            offset + data,
            hole - data,
            &mut buf,
            &mut use_cfr,
        )?;
        pos = hole;
    }
    Ok(copied)
}

#[allow(clippy::too_many_arguments)]
fn copy_range(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    mut from: u64,
    mut to: u64,
    len: u64,
    buf: &mut Vec<u8>,
    use_cfr: &mut bool,
) -> Result<u64> {
    let mut left = len;
    while left > 0 && *use_cfr {
        let mut off_in = from as libc::loff_t;
        let mut off_out = to as libc::loff_t;
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both descriptors are open; the offsets are ours.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EXDEV)
                | Some(libc::ENOSYS)
                | Some(libc::EINVAL)
                | Some(libc::EOPNOTSUPP) => *use_cfr = false,
                Some(libc::EINTR) => continue,
                _ => {
                    return Err(Error::Io {
                        action: "copying into",
                        path: dst_path.into(),
                        source: e,
                    })
                }
            }
        } else if n == 0 {
            return Err(Error::invalid(
                format!("{} ended while being copied", src_path.display()),
                "do not change input files while the disk is assembled",
            ));
        } else {
            from += n as u64;
            to += n as u64;
            left -= n as u64;
        }
    }
    if left > 0 {
        buf.resize(4 << 20, 0);
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], from)
                .map_err(Error::io("reading", src_path))?;
            dst.write_all_at(&buf[..n], to)
                .map_err(Error::io("writing", dst_path))?;
            from += n as u64;
            to += n as u64;
            left -= n as u64;
        }
    }
    Ok(len)
}

fn file_len(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p).map_err(Error::io("reading", p))?.len())
}

/// Writes the GPT of `lay` (and the protective MBR) into the file at `path` with sgdisk.
pub fn write_gpt(path: &Path, lay: &DiskLayout) -> Result<()> {
    let mut cmd = Command::new("sgdisk");
    cmd.arg(format!("--disk-guid={}", lay.disk_guid));
    for p in &lay.partitions {
        let n = p.number;
        cmd.arg(format!("--new={n}:{}:{}", p.start_lba, p.end_lba()))
            .arg(format!("--typecode={n}:{}", p.type_guid))
            .arg(format!("--change-name={n}:{}", p.name))
            .arg(format!("--partition-guid={n}:{}", p.guid));
    }
    cmd.arg(path);
    tools::run(&mut cmd)?;
    Ok(())
}

struct BootImages {
    /// core.img, padded and with its block list patched.
    core: Vec<u8>,
    /// GRUB's boot.img, unpatched.
    boot_img: Vec<u8>,
    /// The ESP FAT image (in `work`).
    esp_img: PathBuf,
}

/// Builds both GRUB images and the ESP in `work`.
fn boot_images(work: &Path, inputs: &DiskInputs, lay: &DiskLayout) -> Result<BootImages> {
    let bios = lay.partition("bios");
    let early = work.join("grub-early.cfg");
    std::fs::write(&early, grub_early_cfg(inputs.boot_fs_uuid))
        .map_err(Error::io("writing", &early))?;
    let core = mkimage(
        "i386-pc",
        GRUB_PC_DIR,
        &early,
        &work.join("core.img"),
        GRUB_MODULES_PC,
    )?;
    let core = patch_core(&core, bios.start_lba, bios.size_bytes)?;
    let efi = mkimage(
        "x86_64-efi",
        GRUB_EFI_DIR,
        &early,
        &work.join("BOOTX64.EFI"),
        GRUB_MODULES_EFI,
    )?;
    let boot_img_path = Path::new(GRUB_PC_DIR).join("boot.img");
    let boot_img = std::fs::read(&boot_img_path).map_err(Error::io("reading", &boot_img_path))?;
    let esp_img = work.join("esp.img");
    crate::fat::make_fat(
        &esp_img,
        lay.partition("esp").size_bytes,
        "ESP",
        esp_volume_id(&inputs.seed),
        &[("EFI/BOOT/BOOTX64.EFI", efi.as_slice())],
    )?;
    Ok(BootImages {
        core,
        boot_img,
        esp_img,
    })
}

/// Builds the whole disk at `out` (written beside it as `<out>.partial` and renamed when
/// complete), with GRUB images and the ESP made in `work`.
pub fn assemble(out: &Path, work: &Path, inputs: &DiskInputs) -> Result<DiskLayout> {
    tools::require("sgdisk")?;
    check_uuid(inputs.boot_fs_uuid)?;
    std::fs::create_dir_all(work).map_err(Error::io("creating", work))?;
    let boot_len = file_len(inputs.boot_fs)?;
    let root_len = file_len(inputs.root)?;
    if boot_len == 0 || root_len == 0 {
        return Err(Error::invalid(
            "the boot image or the root file is empty",
            "build them before the disk",
        ));
    }
    let esp_bytes = if inputs.esp_bytes == 0 {
        DEFAULT_ESP_BYTES
    } else {
        inputs.esp_bytes
    };
    let lay = layout(boot_len, root_len, esp_bytes).with_guids(&inputs.seed);
    let bios = lay.partition("bios").clone();
    let esp = lay.partition("esp").clone();

    // The disk file; sgdisk writes its table while the boot images are built (sgdisk
    // spends a second sleeping after it syncs, so this hides it).
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(Error::io("creating", &partial))?;
    let result = (|| {
        disk.set_len(lay.size_bytes)
            .map_err(Error::io("sizing", &partial))?;
        let (gpt, images) = std::thread::scope(|s| {
            let gpt = s.spawn(|| write_gpt(&partial, &lay));
            let images = boot_images(work, inputs, &lay);
            (
                gpt.join().unwrap_or_else(|_| {
                    Err(Error::Command {
                        command: "sgdisk".into(),
                        status: "panicked".into(),
                        output: String::new(),
                    })
                }),
                images,
            )
        });
        gpt?;
        let BootImages {
            core,
            boot_img,
            esp_img,
        } = images?;

        // Contents.
        disk.write_all_at(&core, bios.offset_bytes())
            .map_err(Error::io("writing", &partial))?;
        copy_sparse(&esp_img, &disk, &partial, esp.offset_bytes())?;
        copy_sparse(
            inputs.boot_fs,
            &disk,
            &partial,
            lay.partition("boot").offset_bytes(),
        )?;
        copy_sparse(
            inputs.root,
            &disk,
            &partial,
            lay.partition("root").offset_bytes(),
        )?;

        // boot.img into the protective MBR sgdisk wrote.
        let mut mbr = [0u8; 512];
        disk.read_exact_at(&mut mbr, 0)
            .map_err(Error::io("reading", &partial))?;
        if mbr[510..512] != [0x55, 0xaa] || mbr[0x1be + 4] != 0xee {
            return Err(Error::invalid(
                format!("sgdisk left no protective MBR in {}", partial.display()),
                "check the sgdisk version (gdisk 1.0 or later)",
            ));
        }
        patch_mbr(&mut mbr, &boot_img, bios.start_lba)?;
        disk.write_all_at(&mbr, 0)
            .map_err(Error::io("writing", &partial))?;
        std::fs::rename(&partial, out).map_err(Error::io("renaming", &partial))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result?;
    Ok(lay)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn layout_is_aligned_ordered_and_leaves_room_for_the_backup_gpt() {
        for (boot, root, esp) in [
            (256 * MIB, 3 << 30, 32 * MIB),
            (1, 1, 1),
            (100 * MIB + 3, 64 * MIB - 1, 33 * MIB),
        ] {
            let l = layout(boot, root, esp);
            let names: Vec<&str> = l.partitions.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["bios", "esp", "boot", "root"]);
            assert_eq!(
                l.partitions[0].start_lba, 2048,
                "room for the primary GPT and 1 MiB alignment"
            );
            for (i, p) in l.partitions.iter().enumerate() {
                assert_eq!(p.number, i as u32 + 1);
                assert_eq!(p.start_lba % ALIGN_LBA, 0, "{p:?}");
                assert_eq!(p.size_bytes % ALIGN, 0, "{p:?}");
                if i > 0 {
                    assert_eq!(
                        l.partitions[i - 1].end_lba() + 1,
                        p.start_lba,
                        "no gap, no overlap"
                    );
                }
            }
            assert_eq!(l.partitions[0].size_bytes, MIB);
            assert_eq!(l.partition("esp").size_bytes, round_up(esp, MIB));
            assert!(
                l.partition("boot").size_bytes >= boot
                    && l.partition("boot").size_bytes < boot + MIB
            );
            assert!(
                l.partition("root").size_bytes >= root
                    && l.partition("root").size_bytes < root + MIB
            );
            let total = l.size_bytes / SECTOR;
            assert_eq!(l.size_bytes % ALIGN, 0);
            // last usable LBA is total - 34 (backup header + entries at the end).
            assert!(l.partition("root").end_lba() <= total - 1 - GPT_SECTORS);
            assert_eq!(total - 1 - l.partition("root").end_lba(), ALIGN_LBA);
        }
        let l = layout(256 * MIB, 3 << 30, 32 * MIB);
        assert_eq!(l.size_bytes, (1 + 1 + 32 + 256 + 3072 + 1) * MIB);
        assert_eq!(l.partition("root").type_guid, TYPE_LUKS);
        assert_eq!(l.partition("bios").type_guid, TYPE_BIOS);
    }

    #[test]
    fn guids_are_deterministic_distinct_and_well_formed() {
        let a = layout(MIB, MIB, MIB).with_guids(&[7; 32]);
        let b = layout(MIB, MIB, MIB).with_guids(&[7; 32]);
        let c = layout(MIB, MIB, MIB).with_guids(&[8; 32]);
        assert_eq!(a, b);
        assert_ne!(a.disk_guid, c.disk_guid);
        let mut all: Vec<&str> = a.partitions.iter().map(|p| p.guid.as_str()).collect();
        all.push(&a.disk_guid);
        for g in &all {
            assert!(check_uuid(g).is_ok(), "{g}");
            assert_eq!(&g[14..15], "4");
        }
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 5);
    }

    fn fake_boot_img() -> Vec<u8> {
        let mut b = vec![0xccu8; 512];
        b[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&1u64.to_le_bytes());
        b[BOOT_DRIVE] = 0xff;
        b[BOOT_DRIVE_CHECK] = 0xeb;
        b[BOOT_DRIVE_CHECK + 1] = 0x05;
        b[510] = 0x55;
        b[511] = 0xaa;
        b
    }

    #[test]
    fn mbr_patch_keeps_the_partition_table() {
        let mut mbr = [0u8; 512];
        for (i, x) in mbr.iter_mut().enumerate().skip(440) {
            *x = i as u8;
        }
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        let before = mbr;
        patch_mbr(&mut mbr, &fake_boot_img(), 2048).unwrap();
        assert_eq!(&mbr[440..], &before[440..]);
        assert_eq!(
            u64::from_le_bytes(mbr[0x5c..0x64].try_into().unwrap()),
            2048
        );
        assert_eq!(mbr[0x64], 0xff);
        assert_eq!(&mbr[0x66..0x68], &[0x90, 0x90]);
        assert_eq!(mbr[0], 0xcc);
        assert_eq!(mbr[0x67 + 1], 0xcc);
        let mut bad = fake_boot_img();
        bad[BOOT_DRIVE_CHECK] = 0;
        assert!(patch_mbr(&mut mbr, &bad, 2048).is_err());
        assert!(patch_mbr(&mut mbr, &bad[..100], 2048).is_err());
    }

    fn fake_core(len: usize) -> Vec<u8> {
        let mut c = vec![0xaau8; len];
        c[BLOCKLIST_START - 12..0x200].fill(0);
        c[BLOCKLIST_START..BLOCKLIST_START + 8].copy_from_slice(&2u64.to_le_bytes());
        c[0x1fe..0x200].copy_from_slice(&0x820u16.to_le_bytes());
        c
    }

    #[test]
    fn core_patch_points_the_block_list_at_the_rest_of_core() {
        let core = fake_core(100 * 512 + 17);
        let img = patch_core(&core, 2048, MIB).unwrap();
        assert_eq!(img.len(), 101 * 512);
        assert_eq!(
            &img[..100 * 512 + 17],
            {
                let mut want = core.clone();
                want[0x1f4..0x1fc].copy_from_slice(&2049u64.to_le_bytes());
                want[0x1fc..0x1fe].copy_from_slice(&100u16.to_le_bytes());
                want
            }
            .as_slice()
        );
        assert!(img[100 * 512 + 17..].iter().all(|&b| b == 0));
        assert_eq!(u16::from_le_bytes([img[0x1fe], img[0x1ff]]), 0x820);
        assert_eq!(&img[0x1f2..0x1f4], &[0, 0], "terminator before the entry");
        // too big for the partition
        assert!(patch_core(&fake_core(MIB as usize + 1), 2048, MIB).is_err());
        // not a diskboot.img
        let mut bad = fake_core(4096);
        bad[0x1fe] = 0;
        assert!(patch_core(&bad, 2048, MIB).is_err());
    }

    #[test]
    fn grub_cfg_boots_the_one_kernel_on_serial() {
        let c = grub_cfg("console=ttyS0,115200 root=/dev/vda4 panic=-1\n");
        assert!(c.contains("serial --unit=0 --speed=115200\n"));
        assert!(c.contains("terminal_input serial console\n"));
        assert!(c.contains("terminal_output serial console\n"));
        assert!(c.contains("set timeout=0\n"));
        assert!(c.contains("\tlinux /vmlinuz console=ttyS0,115200 root=/dev/vda4 panic=-1\n"));
        assert!(c.contains("\t\tinitrd /initrd.img\n"));
        assert!(c.contains("\t\tinitrd /initrd.img /ncimage-enroll.img\n"));
        assert_eq!(c.matches("menuentry").count(), 1);
        assert_eq!(c.matches('{').count(), c.matches('}').count());
        let e = grub_early_cfg("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
        assert_eq!(
            e,
            "search --no-floppy --fs-uuid --set=root 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\nset prefix=($root)/grub\n"
        );
    }

    #[test]
    fn uuid_check() {
        assert!(check_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").is_ok());
        assert!(check_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f").is_err());
        assert!(check_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg").is_err());
        assert!(check_uuid("x; reboot").is_err());
    }

    #[test]
    fn sparse_copy_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 * MIB).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&vec![5u8; 70_000], 40 * MIB + 3).unwrap();
        drop(f);
        let dst_path = dir.path().join("dst");
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dst_path)
            .unwrap();
        dst.set_len(100 * MIB).unwrap();
        let copied = copy_sparse(&src, &dst, &dst_path, MIB).unwrap();
        assert!(copied < 2 * MIB, "copied {copied}");
        let got = std::fs::read(&dst_path).unwrap();
        let want = std::fs::read(&src).unwrap();
        assert!(got[MIB as usize..(65 * MIB) as usize] == want[..]);
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&dst_path).unwrap().blocks();
        assert!(blocks * 512 < 4 * MIB, "dst uses {} bytes", blocks * 512);
    }
}
