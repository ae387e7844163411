//! The deployment's monitoring, live: a real Prometheus and Alertmanager (Debian packages,
//! from scripts/k8s-tools) run with the project's own scrape configuration and alert rules
//! (k8s/base/monitoring), scraping a real `vox agent` (whose LLM backend is unreachable) and a
//! real `vox serve`, all inside a network namespace. A caller asks three questions: the agent
//! answers each with its fallback, its LLM circuit breaker opens, and the alert for it must
//! reach Alertmanager. The dashboard and the rules must query only metric names the binaries
//! really export.
//!
//! What differs from the cluster, and why: the scrape jobs find their targets by DNS in the
//! cluster; here each job's DNS names are replaced by the local address of the same program
//! (nothing else of the job changes), and the intervals are 1 s so the test takes seconds, not
//! minutes. The rules, their `for` durations and the Alertmanager configuration are unchanged.

mod common;

use common::netns::{AGENT_IP, Agent, Netns, curl_get, free_port};
use common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A server process in the namespace, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(ns: &Netns, program: &'static str, args: &[String], log: &Path) -> Server {
    installed(
        program,
        "run scripts/k8s-tools (it installs prometheus and prometheus-alertmanager)",
    );
    let child = ns
        .command(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    Server(child)
}

/// GET `url` inside the namespace until `ok` holds on the body, or `timeout`; the last body.
fn wait_for(ns: &Netns, url: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> (bool, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, body) = curl_get(ns.command("curl"), url);
        if code == 200 && ok(&body) {
            return (true, body);
        }
        if Instant::now() > deadline {
            return (false, body);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The value of a Prometheus instant query's first result, if any.
fn query(ns: &Netns, prometheus: &str, promql: &str) -> Option<f64> {
    let out = check(ns.command("curl").args([
        "-s",
        "--get",
        "--data-urlencode",
        &format!("query={promql}"),
        &format!("{prometheus}/api/v1/query"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// Names of the series a `/metrics` body can hold, from its `# TYPE` lines (so families with no
/// sample yet count too): counters as NAME_total, histograms as _bucket/_sum/_count, info as
/// NAME_info.
fn exported(body: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => names.push(format!("{name}_total")),
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    names.push(format!("{name}{s}"));
                }
            }
            "info" => names.push(format!("{name}_info")),
            _ => names.push(name.to_string()),
        }
    }
    names
}

/// Metric names a PromQL expression uses (identifiers starting vox_ or DCGM_, and `up`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_alphabetic() || bytes[i] == '_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_') {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            let quoted = start > 0 && bytes[start - 1] == '"';
            if !quoted && (word.starts_with("vox_") || word.starts_with("DCGM_") || word == "up") {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The DCGM exporter's default counters that the dashboard and rules use (it is NVIDIA's
/// program, not ours, and cannot run without a GPU).
const DCGM: [&str; 3] = [
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
];

/// Every PromQL expression of the dashboard, the alert rules and prometheus-adapter's rule.
fn expressions() -> Vec<(String, String)> {
    let monitoring = repo().join("k8s/base/monitoring");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring.join("dashboard-voice-ai.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    let panels = dash["panels"].as_array().expect("the dashboard has panels");
    assert!(panels.len() >= 10);
    for p in panels {
        assert_eq!(
            p["datasource"]["uid"], "prometheus",
            "panel {} does not use the provisioned data source",
            p["title"]
        );
        for t in p["targets"].as_array().unwrap() {
            exprs.push((
                format!("dashboard panel {}", p["title"]),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    let out = check(
        k8s_venv("python")
            .arg("-c")
            .arg(
                "import json, sys, yaml\n\
         rules = yaml.safe_load(open(sys.argv[1]))\n\
         adapter = yaml.safe_load(open(sys.argv[2]))\n\
         out = [['alert ' + r['alert'], r['expr']] for g in rules['groups'] for r in g['rules']]\n\
         out += [['prometheus-adapter', r['seriesQuery']] for r in adapter['rules']]\n\
         print(json.dumps(out))",
            )
            .arg(monitoring.join("rules.yml"))
            .arg(monitoring.join("prometheus-adapter-config.yaml")),
    );
    let more: Vec<(String, String)> = serde_json::from_str(&out).unwrap();
    exprs.extend(more);
    exprs
}

#[test]
fn prometheus_scrapes_the_agent_and_the_llm_circuit_alert_reaches_alertmanager() {
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new();
    // Three questions, 6 s apart: three LLM failures open the circuit breaker.
    let q = spoken(dir.path(), "What is the capital of France?", "q.wav");
    let three = dir.path().join("three.wav");
    check(
        tool("sox")
            .arg(&q)
            .arg(&three)
            .args(["pad", "0", "6", "repeat", "2"]),
    );

    // The speech service (both jobs, whisper and kokoro, point at it) and the agent.
    let serve_port = free_port();
    let mut serve = ns.command(env!("CARGO_BIN_EXE_vox"));
    isolate(&mut serve);
    serve
        .args([
            "serve",
            "all",
            "--listen",
            &format!("{AGENT_IP}:{serve_port}"),
        ])
        .env("POD_NAME", "speech-0")
        .env("POD_NAMESPACE", "voice-ai")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("serve.log")).unwrap());
    let _serve = Server(serve.spawn().expect("vox serve starts"));
    let mut agent = Agent::start(&ns, 8461, &["llm=http://127.0.0.1:9/v1"]);
    let agent_http = format!("{AGENT_IP}:{}", agent.http_port);
    let serve_http = format!("{AGENT_IP}:{serve_port}");
    let (up, _) = wait_for(
        &ns,
        &format!("http://{serve_http}/readyz"),
        Duration::from_secs(120),
        |_| true,
    );
    assert!(
        up,
        "vox serve did not get ready: {}",
        std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
    );

    // The project's scrape config and rules; DNS names become the local addresses.
    let am_port = free_port();
    let prom_port = free_port();
    let config = dir.path().join("prometheus.yml");
    let targets = serde_json::json!({
        "agent": [agent_http],
        "whisper": [serve_http],
        "kokoro": [serve_http],
        "alertmanager": [format!("127.0.0.1:{am_port}")],
        "prometheus": [format!("127.0.0.1:{prom_port}")],
    });
    check(
        k8s_venv("python")
            .arg("-c")
            .arg(
                "import json, shutil, sys, yaml\n\
                 src, dst, rules, targets, am = sys.argv[1:6]\n\
                 c = yaml.safe_load(open(src))\n\
                 targets = json.loads(targets)\n\
                 c['global'].update(scrape_interval='1s', evaluation_interval='1s')\n\
                 c['alerting']['alertmanagers'][0]['static_configs'][0]['targets'] = [am]\n\
                 jobs = []\n\
                 for j in c['scrape_configs']:\n\
                 \x20   if j['job_name'] in targets:\n\
                 \x20       j.pop('dns_sd_configs', None)\n\
                 \x20       j['static_configs'] = [{'targets': targets[j['job_name']]}]\n\
                 \x20       jobs.append(j)\n\
                 c['scrape_configs'] = jobs\n\
                 yaml.safe_dump(c, open(dst, 'w'))\n\
                 shutil.copy(rules, dst.rsplit('/', 1)[0] + '/rules.yml')\n",
            )
            .arg(repo().join("k8s/base/monitoring/prometheus.yml"))
            .arg(&config)
            .arg(repo().join("k8s/base/monitoring/rules.yml"))
            .arg(targets.to_string())
            .arg(format!("127.0.0.1:{am_port}")),
    );
    let _alertmanager = spawn(
        &ns,
        "prometheus-alertmanager",
        &[
            format!(
                "--config.file={}",
                repo()
                    .join("k8s/base/monitoring/alertmanager.yml")
                    .display()
            ),
            format!("--storage.path={}", dir.path().join("am").display()),
            format!("--web.listen-address=127.0.0.1:{am_port}"),
            "--cluster.listen-address=".into(),
        ],
        &dir.path().join("alertmanager.log"),
    );
    let _prometheus = spawn(
        &ns,
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        &dir.path().join("prometheus.log"),
    );
    let prometheus = format!("http://127.0.0.1:{prom_port}");
    let logs = || {
        ["prometheus.log", "alertmanager.log"]
            .iter()
            .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (ready, _) = wait_for(
        &ns,
        &format!("{prometheus}/-/ready"),
        Duration::from_secs(30),
        |_| true,
    );
    assert!(ready, "Prometheus did not start:\n{}", logs());

    // Every target is up, scraped with our labels.
    for job in ["agent", "whisper", "kokoro", "alertmanager"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while query(&ns, &prometheus, &format!("up{{job=\"{job}\"}}")) != Some(1.0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(
            query(&ns, &prometheus, &format!("up{{job=\"{job}\"}}")),
            Some(1.0),
            "target {job} is not up:\n{}",
            logs()
        );
    }
    assert_eq!(
        query(
            &ns,
            &prometheus,
            "vox_accelerator_info{job=\"whisper\", pod=\"speech-0\", namespace=\"voice-ai\", device=\"cpu\"}"
        ),
        Some(1.0),
        "the pod and namespace labels from the environment did not reach Prometheus"
    );

    // The call: three questions, three fallbacks.
    let record = dir.path().join("call.wav");
    let mut call = ns.command(env!("CARGO_BIN_EXE_vox"));
    isolate(&mut call);
    let out = run(call
        .args(["call", "--webrtc", &agent.url, "--play"])
        .arg(&three)
        .arg("--record")
        .arg(&record)
        .args(["--timeout-s", "120"]));
    let log = agent.drain_log();
    assert!(
        out.status.success(),
        "{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The latency histograms have samples, in Prometheus.
    let deadline = Instant::now() + Duration::from_secs(20);
    let samples = || {
        query(
            &ns,
            &prometheus,
            "vox_voice_to_voice_seconds_count{job=\"agent\"}",
        )
    };
    while samples().unwrap_or(0.0) < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        samples().unwrap_or(0.0) >= 1.0,
        "no voice-to-voice samples in Prometheus\n{log}"
    );
    for h in [
        "vox_transcript_seconds_count",
        "vox_first_audio_seconds_count",
    ] {
        assert!(
            query(&ns, &prometheus, &format!("{h}{{job=\"agent\"}}")).unwrap_or(0.0) >= 1.0,
            "{h} has no samples"
        );
    }
    assert_eq!(
        query(&ns, &prometheus, "vox_llm_circuit_open{job=\"agent\"}"),
        Some(1.0),
        "three LLM failures did not open the circuit\n{log}"
    );

    // The alert fires after its `for` (15 s) and reaches Alertmanager.
    let (reached, alerts) = wait_for(
        &ns,
        &format!("http://127.0.0.1:{am_port}/api/v2/alerts"),
        Duration::from_secs(60),
        |body| body.contains("\"alertname\":\"LLMBackendCircuitOpen\""),
    );
    assert!(
        reached,
        "LLMBackendCircuitOpen did not reach Alertmanager: {alerts}\n{}",
        logs()
    );
    let alerts: serde_json::Value = serde_json::from_str(&alerts).unwrap();
    let alert = alerts
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "LLMBackendCircuitOpen")
        .unwrap();
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["status"]["state"], "active");

    // The dashboard, the rules and the adapter query only names the binaries export (the
    // speech service's labelled families appear with its first requests).
    let transcribed = check(ns.command("curl").args([
        "-sf",
        "-F",
        &format!("file=@{}", fixture("jfk.wav").display()),
        "-F",
        "model=whisper-1",
        &format!("http://{serve_http}/v1/audio/transcriptions"),
    ]));
    assert!(transcribed.contains("ask not"), "{transcribed}");
    check(ns.command("curl").args([
        "-sf",
        "-o",
        "/dev/null",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"model": "tts-1", "input": "Hello.", "voice": "jf_alpha"}"#,
        &format!("http://{serve_http}/v1/audio/speech"),
    ]));
    let mut names =
        exported(&curl_get(ns.command("curl"), &format!("http://{agent_http}/metrics")).1);
    names.extend(exported(
        &curl_get(ns.command("curl"), &format!("http://{serve_http}/metrics")).1,
    ));
    assert!(
        names.iter().any(|n| n == "vox_sessions_active"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "vox_serve_requests_total"),
        "{names:?}"
    );
    for (whose, expr) in expressions() {
        for name in metric_names(&expr) {
            assert!(
                name == "up" || names.contains(&name) || DCGM.contains(&name.as_str()),
                "{whose} queries {name}, which neither vox agent nor vox serve exports ({expr})"
            );
        }
    }
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.95, sum by (le) (rate(vox_voice_to_voice_seconds_bucket[5m]))) > 1.6"
        ),
        ["vox_voice_to_voice_seconds_bucket"]
    );
    assert_eq!(
        metric_names("up{job=~\"agent|whisper\"} == 0 or DCGM_FI_DEV_FB_USED{x=\"vox_no\"}"),
        ["up", "DCGM_FI_DEV_FB_USED"]
    );
    assert_eq!(
        exported(
            "# TYPE vox_turns counter\n# TYPE vox_x histogram\n# TYPE vox_a info\n# TYPE vox_g gauge\n"
        ),
        [
            "vox_turns_total",
            "vox_x_bucket",
            "vox_x_sum",
            "vox_x_count",
            "vox_a_info",
            "vox_g"
        ]
    );
}
