//! The K3s deployment (`k8s/`), checked as far as possible without a cluster (none can run
//! here: platform.md): every overlay renders with `kubectl kustomize`, validates strictly
//! against the Kubernetes 1.33 schemas, passes checkov's security checks and our own policy
//! (tests/k8s_policy.py), and the monitoring configuration passes promtool and amtool. Each
//! check is also shown to fail on a manifest broken the way it guards against.
//!
//! Tools: `scripts/k8s-tools` (Debian prometheus and prometheus-alertmanager; a venv with
//! kubernetes-validate, checkov and PyYAML); kubectl.

mod common;

use common::{check, installed, k8s_venv as venv, repo, run};
use std::path::{Path, PathBuf};

const OVERLAYS: [&str; 3] = ["gpu", "cpu", "hybrid"];
/// The custom resources kubernetes-validate has no schema for; k8s_policy.py checks them.
const CUSTOM_KINDS: [&str; 3] = ["HelmChart", "IngressRoute", "Middleware"];

const PROMETHEUS_TOOLS: &str =
    "run scripts/k8s-tools (it installs prometheus and prometheus-alertmanager)";
/// `kubectl kustomize k8s/overlays/NAME` into `dir/NAME.yaml`.
fn render(overlay: &str, dir: &Path) -> PathBuf {
    let text = check(
        installed(
            "kubectl",
            "it renders the overlays (kubectl kustomize); see scripts/k8s-tools",
        )
        .arg("kustomize")
        .arg(repo().join("k8s/overlays").join(overlay)),
    );
    let path = dir.join(format!("{overlay}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `text` with its first `from` replaced by `to` (which must be there).
fn break_once(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in the manifests");
    text.replacen(from, to, 1)
}

fn validate(file: &Path) -> std::process::Output {
    run(venv("kubernetes-validate")
        .args(["--strict", "-k", "1.33.0"])
        .arg(file))
}

#[test]
fn every_overlay_validates_strictly_against_kubernetes_1_33() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let file = render(overlay, dir.path());
        let out = validate(&file);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{overlay}: {text}");
        let passed = text.lines().filter(|l| l.contains(" passed for ")).count();
        assert!(
            passed > 60,
            "{overlay}: only {passed} objects validated:\n{text}"
        );
        // Only the custom resources may go unvalidated, and k8s_policy.py checks those.
        for line in text.lines().filter(|l| l.starts_with("WARN")) {
            assert!(
                CUSTOM_KINDS
                    .iter()
                    .any(|k| line.contains(&format!("kind {k} "))),
                "{overlay}: {line}"
            );
        }
    }
    // A field Kubernetes does not know fails strict validation.
    let text = std::fs::read_to_string(dir.path().join("gpu.yaml")).unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        break_once(
            &text,
            "imagePullPolicy: IfNotPresent",
            "imagePullPolicy: IfNotPresent\n        imagePullPolice: Always",
        ),
    )
    .unwrap();
    assert!(!validate(&bad).status.success(), "a misspelt field passed");
}

#[test]
fn our_policy_holds_in_every_overlay_and_catches_each_break() {
    let dir = tempfile::tempdir().unwrap();
    let policy = repo().join("tests/k8s_policy.py");
    for overlay in OVERLAYS {
        let file = render(overlay, dir.path());
        let out = run(venv("python").arg(&policy).arg(&file).arg(overlay));
        assert!(
            out.status.success(),
            "{overlay}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each check fails on the manifests broken the way it guards against.
    let out = run(venv("python")
        .arg(&policy)
        .arg("--self-test")
        .arg(dir.path().join("gpu.yaml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.lines().count() >= 15, "{text}");
    assert!(!text.contains("NOT CAUGHT"), "{text}");
}

/// A check id and the resource it was about (`Kind.namespace.name`).
type Finding = (String, String);

/// checkov's findings over `file`: (failed, skipped).
fn checkov(file: &Path) -> (Vec<Finding>, Vec<Finding>) {
    let out = run(venv("checkov")
        .arg("-f")
        .arg(file)
        .args(["--framework", "kubernetes", "-o", "json"])
        .env("BC_SKIP_MAPPING", "TRUE"));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov printed no report ({e}):\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let results = &report["results"];
    assert!(
        results["passed_checks"].as_array().map_or(0, Vec::len) > 500,
        "checkov ran too few checks: {}",
        report["summary"]
    );
    let list = |key: &str| -> Vec<Finding> {
        results[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["check_id"].as_str().unwrap().to_string(),
                    c["resource"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    (list("failed_checks"), list("skipped_checks"))
}

/// k8s/policy/checkov.yaml as JSON.
fn checkov_policy() -> serde_json::Value {
    let out = check(
        venv("python")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            ])
            .arg(repo().join("k8s/policy/checkov.yaml")),
    );
    serde_json::from_str(&out).unwrap()
}

#[test]
fn checkov_passes_every_check_but_the_accepted_ones_and_fails_a_root_container() {
    let policy = checkov_policy();
    let accepted: Vec<&str> = policy["accepted"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let skips: Vec<Finding> = policy["skips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["check"].as_str().unwrap().to_string(),
                s["resource"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let required: Vec<&str> = policy["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(required.len() >= 20, "{required:?}");
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let file = render(overlay, dir.path());
        let (failed, skipped) = checkov(&file);
        let unexpected: Vec<_> = failed
            .iter()
            .filter(|(id, _)| !accepted.contains(&id.as_str()))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{overlay}: checkov failed {unexpected:?}"
        );
        for skip in &skipped {
            assert!(
                skips.contains(skip),
                "{overlay}: {skip:?} is skipped but not listed in k8s/policy/checkov.yaml"
            );
        }
    }
    // A container as root: the required root-container checks fail.
    let text = std::fs::read_to_string(dir.path().join("gpu.yaml")).unwrap();
    let bad = dir.path().join("root.yaml");
    std::fs::write(
        &bad,
        break_once(
            &text,
            "readOnlyRootFilesystem: true\n          runAsNonRoot: true",
            "readOnlyRootFilesystem: true\n          runAsNonRoot: false\n          runAsUser: 0",
        ),
    )
    .unwrap();
    let (failed, _) = checkov(&bad);
    let caught: Vec<_> = failed
        .iter()
        .filter(|(id, _)| required.contains(&id.as_str()) && !accepted.contains(&id.as_str()))
        .collect();
    assert!(
        caught
            .iter()
            .any(|(id, _)| id == "CKV_K8S_23" || id == "CKV_K8S_40"),
        "a root container passed checkov's required checks: {failed:?}"
    );
}

#[test]
fn prometheus_and_alertmanager_configs_pass_promtool_and_amtool() {
    let monitoring = repo().join("k8s/base/monitoring");
    check(
        installed("promtool", PROMETHEUS_TOOLS)
            .args(["check", "config"])
            .arg(monitoring.join("prometheus.yml")),
    );
    check(
        installed("promtool", PROMETHEUS_TOOLS)
            .args(["check", "rules"])
            .arg(monitoring.join("rules.yml")),
    );
    // Each alert fires on its series, after its `for` and not before.
    let out = check(
        installed("promtool", PROMETHEUS_TOOLS)
            .args(["test", "rules", "rules_test.yml"])
            .current_dir(&monitoring),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    check(
        installed("amtool", PROMETHEUS_TOOLS)
            .arg("check-config")
            .arg(monitoring.join("alertmanager.yml")),
    );
    // A broken rule is caught.
    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(monitoring.join("rules.yml")).unwrap();
    let bad = dir.path().join("rules.yml");
    std::fs::write(
        &bad,
        break_once(
            &rules,
            "max by (namespace, pod) (vox_llm_circuit_open)",
            "max by (namespace, pod) (vox_llm_circuit_open",
        ),
    )
    .unwrap();
    assert!(
        !run(installed("promtool", PROMETHEUS_TOOLS)
            .args(["check", "rules"])
            .arg(&bad))
        .status
        .success()
    );
}
