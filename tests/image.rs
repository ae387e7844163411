//! The container image: `Containerfile`, built by `scripts/image` with podman. No registry
//! image can be pulled here, so its Debian 12 base comes from debootstrap. The image is then
//! run the way the K3s pods run it:
//! - as its own non-root user;
//! - on a read-only root filesystem, with a tmpfs /tmp;
//! - with no capabilities and no new privileges;
//! - with the models on a read-only volume.
//!
//! `vox doctor` must pass there.
//!
//! Why not `podman run`: containers cannot be started on this machine. crun and runc both fail
//! with "setrlimit: Operation not permitted" in this sandbox, and crun cannot manage its hybrid
//! cgroups. Building works (chroot isolation). So the test runs the image's own root
//! filesystem, user and environment (from `podman image mount` and `podman image inspect`)
//! with util-linux: a private mount namespace, the root bound read-only, chroot, then setpriv
//! to drop the user, groups and every capability.

mod common;

use common::{check, installed, repo, run, vox};
use std::process::{Command, Output};

const TAG: &str = "localhost/vox:test";

fn podman() -> Command {
    installed(
        "podman",
        "run scripts/image (it installs podman and debootstrap)",
    )
}

/// Runs `command` (argv) in the image as a pod would, with the models at /models.
fn contained(root: &str, user: &str, env: &[String], models: &str, command: &[&str]) -> Output {
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let script = r#"
set -e
root="$1"; models="$2"; uid="$3"; gid="$4"; shift 4
new="$(mktemp -d)"
mount --bind "$root" "$new"
mount -o remount,bind,ro "$new"
mount -t proc proc "$new/proc"
mount --rbind /dev "$new/dev"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$new/tmp"
mount --bind "$models" "$new/models"
mount -o remount,bind,ro "$new/models"
exec chroot "$new" setpriv --reuid "$uid" --regid "$gid" --clear-groups \
  --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs "$@"
"#;
    let mut c = installed("unshare", "util-linux is part of Debian");
    c.args(["--mount", "--pid", "--fork", "--propagation", "private"])
        .args(["sh", "-c", script, "contained"])
        .args([root, models, uid, gid])
        .arg("env")
        .arg("-i")
        .args(env)
        .args(command);
    run(&mut c)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_image_runs_vox_doctor_as_non_root_on_a_read_only_root() {
    check(
        Command::new(repo().join("scripts/image"))
            .arg(TAG)
            .env("VOX_SETUP_QUIET", "1"),
    );
    let config: serde_json::Value = serde_json::from_str(&check(podman().args([
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        TAG,
    ])))
    .unwrap();
    let user = config["User"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        user, "10001:10001",
        "the image does not name its non-root user"
    );
    assert_eq!(config["Entrypoint"][0], "vox");
    let env: Vec<String> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    assert!(env.iter().any(|e| e == "VOX_MODELS=/models"), "{env:?}");
    let root = check(podman().args(["image", "mount", TAG]))
        .trim()
        .to_string();
    struct Unmount;
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = podman().args(["image", "unmount", TAG]).output();
        }
    }
    let _unmount = Unmount;
    let models = check(vox().args(["models", "dir"])).trim().to_string();
    let empty = tempfile::tempdir().unwrap();

    // vox doctor: the models, our plugins, ONNX Runtime and the GStreamer elements are found.
    let out = contained(&root, &user, &env, &models, &["vox", "doctor"]);
    let said = text(&out);
    assert!(
        out.status.success(),
        "vox doctor failed in the image:\n{said}"
    );
    for needle in ["whisperstt", "kokorotts", "silerovad", "llmchat"] {
        assert!(
            said.contains(needle),
            "doctor did not check {needle}:\n{said}"
        );
    }
    // The image's ggml is built for AVX2 alone (VOX_PORTABLE=1), and whisperstt's own matrix
    // kernels still take what this CPU has (AVX-512 where it has it).
    let kernels = format!(
        "Whisper's matrix products: {}",
        gstvoxwhisper::gemm::describe()
    );
    assert!(said.contains(&kernels), "{kernels:?} in\n{said}");

    // Who it ran as, and that nothing outside /tmp can be written.
    let out = contained(&root, &user, &env, &models, &["id", "-u"]);
    assert_eq!(text(&out).trim(), "10001");
    let out = contained(
        &root,
        &user,
        &env,
        &models,
        &["sh", "-c", "touch /tmp/ok && touch /usr/local/bin/x"],
    );
    assert!(
        !out.status.success() && text(&out).contains("Read-only file system"),
        "{}",
        text(&out)
    );

    // No models are baked in: with an empty volume, doctor says what is missing and fails.
    let out = contained(
        &root,
        &user,
        &env,
        empty.path().to_str().unwrap(),
        &["vox", "doctor"],
    );
    assert!(
        !out.status.success(),
        "doctor passed with no models:\n{}",
        text(&out)
    );
}
