# ncimage recipes. `just` itself comes from `cargo install just --locked` (scripts/setup-host).

role := "redis"

# List the recipes.
default:
    @just --list

# Install the host tools (apt, bookworm-backports, just).
setup:
    scripts/setup-host

# Build the image of a role into out/<role>.
build role=role:
    cargo build --quiet --bin ncimage
    ./target/debug/ncimage build --role {{role}}

# Build the test fixtures (Nextcloud- and Collabora-shaped archives) and their spec into target/fixtures.
fixtures:
    qemu-tests/fixtures/build-all target/fixtures

# Build all seven roles (app and collabora from the test fixtures) into out/.
build-all:
    cargo build --quiet --bin ncimage
    ./target/debug/ncimage build --all --spec "$(qemu-tests/fixtures/build-all target/fixtures)"

# Boot a built image under QEMU and assert its checks (firmware: uefi or bios).
boot role=role firmware="uefi":
    cargo build --quiet --bin ncimage
    ./target/debug/ncimage test --role {{role}} --firmware {{firmware}}

# Build and boot, as the README's first command.
run role=role:
    scripts/build-and-boot {{role}}

# The tests as CI runs them (the QEMU tests in qemu-tests/extended skipped).
test:
    scripts/test

# Every test, the extended QEMU tests included (nfs, lb, backup, collabora boots, every export format).
test-all:
    scripts/test --all

# Fast tests only (unit and CLI, no QEMU).
test-unit:
    cargo test

# The QEMU tests only (real builds and boots), all of them.
test-qemu:
    cargo test --test qemu -- --ignored --test-threads=1

# Only the QEMU tests CI skips (qemu-tests/extended).
test-qemu-extended:
    cargo test --test qemu -- --ignored --test-threads=1 --exact $(grep -v '^#' qemu-tests/extended)

# The whole lab cluster: build every image (fixtures for app and collabora), boot it, test it, tear it down.
lab:
    scripts/lab

# Benchmarks: cold/warm/template-only builds, boot-to-ready, sizes.
bench:
    scripts/bench
