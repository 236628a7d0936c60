//! `fogmesh sim` on the bundled scenarios (`simulations/scenarios/`), as a researcher
//! runs it: the binary, a scenario file, the JSON it prints and the files it writes.
//! The reliability figures are asserted here: a black-holed link and a frozen peer
//! declared down within 5 s, convergence within 10 s of healing, no node declared down
//! without a cause, also under 5 % loss (60 s here; the simulated 30 minutes in
//! `just soak`), and a 2|1 split whose minority refuses to apply a spec. The plant
//! scenario (22 nodes on three levels, field devices replaying TEP) runs in under two
//! minutes, and its report opens in headless Chromium, offline, showing the nodes, the
//! timeline, the windows and the versions served; so does the 100-node segmented
//! plant's (`just soak`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::fixtures::{fogmesh_binary, ONE_MESH_AT_A_TIME};

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../simulations/scenarios")
        .join(name)
}

/// Runs `fogmesh sim` to its end; the report it printed, and whether it exited 0.
fn simulate(name: &str, out: &Path, extra: &[&str]) -> (Value, bool) {
    let output = Command::new(fogmesh_binary())
        .arg("sim")
        .arg(scenario(name))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("fogmesh sim runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON report from {name} ({e}); stderr:\n{stderr}"));
    eprintln!("{name}: {stderr}");
    (report, output.status.success())
}

fn figure(report: &Value, check: &str, fault: Option<u64>) -> Value {
    report["expectations"]
        .as_array()
        .expect("expectations")
        .iter()
        .find(|c| {
            c["expectation"]["check"] == check
                && fault.is_none_or(|f| c["expectation"]["fault"] == f)
        })
        .unwrap_or_else(|| panic!("no {check} check in {report}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_link_and_a_frozen_peer_are_declared_down_within_five_seconds() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (report, exited_ok) = simulate("reliability.toml", dir.path(), &[]);
    for (check, fault, limit) in [
        ("declared_down", 0, 5.0),
        ("converged", 1, 10.0),
        ("declared_down", 2, 5.0),
        ("converged", 3, 10.0),
    ] {
        let result = figure(&report, check, Some(fault));
        let seconds = result["figure"].as_f64().unwrap_or(f64::INFINITY);
        assert!(
            result["passed"] == true && seconds <= limit,
            "{check} after fault {fault}: {result}"
        );
    }
    let spurious = figure(&report, "no_spurious_down", None);
    assert_eq!(spurious["figure"], 0.0, "{spurious}");
    assert!(exited_ok && report["passed"] == true);
    assert_eq!(report["nodes"], 4);
    // Every node ran to the end: the frozen one was thawed, the cut one healed.
    for node in report["topology"]["nodes"].as_array().expect("nodes") {
        assert_eq!(node["at_end"], "running", "{node}");
    }
    // The report on disk is the one printed, and the page names every node.
    let on_disk: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("report.json")).expect("report.json"),
    )
    .expect("report.json is JSON");
    assert_eq!(on_disk["trace_sha256"], report["trace_sha256"]);
    let html = std::fs::read_to_string(dir.path().join("report.html")).expect("report.html");
    for n in 1..=4 {
        assert!(
            html.contains(&format!("node-{n}")),
            "node-{n} missing from the page"
        );
    }
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_is_declared_down_under_five_percent_loss() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (report, exited_ok) = simulate("lossy.toml", dir.path(), &["--duration", "60"]);
    let spurious = figure(&report, "no_spurious_down", None);
    assert_eq!(spurious["figure"], 0.0, "{spurious}");
    assert!(exited_ok);
    // The loss was real: gossip datagrams were dropped on the links.
    let dropped: u64 = report["traffic"]
        .as_array()
        .expect("traffic")
        .iter()
        .map(|t| t["dropped"].as_u64().unwrap_or(0))
        .sum();
    let datagrams: u64 = report["traffic"]
        .as_array()
        .expect("traffic")
        .iter()
        .map(|t| t["datagrams"].as_u64().unwrap_or(0))
        .sum();
    let share = dropped as f64 / (dropped + datagrams).max(1) as f64;
    assert!(
        (0.03..0.07).contains(&share),
        "{dropped} of {} dropped",
        dropped + datagrams
    );
}

/// `just soak`: the simulated 30 minutes of 5 % loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "30 minutes; `just soak`"]
async fn soak_thirty_minutes_of_five_percent_loss_declare_no_node_down() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (report, exited_ok) = simulate("lossy.toml", dir.path(), &[]);
    let spurious = figure(&report, "no_spurious_down", None);
    assert_eq!(spurious["figure"], 0.0, "{spurious}");
    assert!(exited_ok && report["simulated_s"].as_f64().unwrap_or(0.0) >= 1_800.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minority_of_a_split_refuses_to_apply_and_takes_the_majoritys_spec_after_the_heal() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (report, exited_ok) = simulate("split.toml", dir.path(), &[]);
    // The nodes and the simulator's applies went over mutual TLS.
    assert_eq!(report["tls"], true);
    let node_1 = std::fs::read_to_string(dir.path().join("nodes/node-1/node.toml")).unwrap();
    assert!(
        node_1.contains("cert = ") && !node_1.contains("insecure"),
        "{node_1}"
    );
    let refused = figure(&report, "applied", Some(1));
    assert_eq!(refused["passed"], true, "{refused}");
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("reaches 1 of the 3 nodes")),
        "{refused}"
    );
    assert_eq!(figure(&report, "applied", Some(2))["passed"], true);
    let healed = figure(&report, "converged", Some(3));
    assert!(
        healed["passed"] == true && healed["figure"].as_f64() <= Some(10.0),
        "{healed}"
    );
    assert!(exited_ok);
    // Every node ends on the spec the majority applied (v1 at the start, v2 in the split).
    let last_spec = |node: &str| {
        report["timeline"]
            .as_array()
            .expect("timeline")
            .iter()
            .rfind(|e| e["kind"] == "spec" && e["node"] == node)
            .map(|e| e["detail"].clone())
    };
    for node in ["node-1", "node-2", "node-3"] {
        assert_eq!(last_spec(node), Some(Value::from("v2")), "{node}");
    }
}

/// Opens `dir/report.html` in headless Chromium, offline: the DOM it rendered, and
/// how many pixels of its screenshot are green (running nodes in the topology) and
/// red (spans where most nodes saw a node down in the timeline).
fn open_in_chromium(dir: &Path) -> (String, usize, usize) {
    let page = dir.join("report.html");
    let shot = dir.join("report.png");
    let chromium = |args: &[&str]| {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1200,1600",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.join("chromium").display()
            ))
            .args(args)
            .arg(format!("file://{}", page.display()))
            .output()
            .expect("Debian's chromium is installed (just setup-browser)")
    };
    let dom = chromium(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let taken = chromium(&[&format!("--screenshot={}", shot.display())]);
    assert!(
        shot.is_file(),
        "no screenshot: {}",
        String::from_utf8_lossy(&taken.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&shot).expect("the screenshot"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("a size")];
    let frame = reader.next_frame(&mut pixels).expect("a frame");
    let step = frame.color_type.samples();
    let count = |wanted: [u8; 3]| {
        pixels[..frame.buffer_size()]
            .chunks(step)
            .filter(|p| p.len() >= 3 && p[..3].iter().zip(wanted).all(|(a, b)| a.abs_diff(b) < 24))
            .count()
    };
    let (green, red) = (count([0x3a, 0x9d, 0x5d]), count([0xc0, 0x39, 0x2b]));
    (dom, green, red)
}

/// The field devices of a report each had rows acknowledged, and the nodes they feed
/// scored windows of them.
fn assert_sensors_scored(report: &Value) {
    let sensors = report["sensors"].as_array().expect("sensors");
    assert!(!sensors.is_empty());
    for device in sensors {
        assert!(
            device["rows_acked"].as_u64() > Some(0),
            "nothing acknowledged: {device}"
        );
        let node = &device["node"];
        let windows = report["windows"]
            .as_array()
            .expect("windows")
            .iter()
            .find(|w| &w["node"] == node)
            .unwrap_or_else(|| panic!("no windows of {node}"));
        assert!(windows["scored"].as_u64() > Some(0), "{windows}");
    }
    let versions = report["versions"].as_array().expect("versions");
    assert!(
        versions
            .iter()
            .any(|v| v["expert"] == "ae" && v["version"] == "v1"),
        "{versions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plant_on_three_levels_runs_in_two_minutes_and_its_report_opens_offline_in_chromium() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (report, exited_ok) = simulate("plant.toml", dir.path(), &[]);
    assert!(exited_ok, "{}", report["expectations"]);
    assert_eq!(
        (report["nodes"].as_u64(), report["levels"].as_u64()),
        (Some(22), Some(3))
    );
    let wall = report["wall_s"].as_f64().expect("wall_s");
    assert!(wall < 120.0, "the plant took {wall} s");
    assert_sensors_scored(&report);
    assert_eq!(figure(&report, "active_versions", None)["figure"], 1.0);

    let (dom, green, red) = open_in_chromium(dir.path());
    for shown in [
        "id=\"topology\"",
        "id=\"timeline\"",
        "id=\"windows\"",
        "id=\"versions\"",
        "gw-1a-2",
        "site2-server-1",
        "cell-2b",
        "reactor-1a",
        "passed",
    ] {
        assert!(
            dom.contains(shown),
            "{shown} is not in the page Chromium rendered"
        );
    }
    assert!(
        green > 500 && red > 200,
        "green {green} px, red {red} px in the screenshot"
    );
}

/// In `just soak`, not CI: a hundred node processes take about 20 GiB and both cores
/// of a two-core machine, and while they start, links can miss their heartbeats on a
/// machine with anything else to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "100 node processes, about 20 GiB; `just soak`"]
async fn soak_a_hundred_node_segmented_plant_runs_and_its_report_opens_offline_in_chromium() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (report, exited_ok) = simulate("plant-100.toml", dir.path(), &[]);
    assert!(exited_ok, "{}", report["expectations"]);
    assert_eq!(
        (report["nodes"].as_u64(), report["levels"].as_u64()),
        (Some(100), Some(3))
    );
    assert!(report["sim_to_wall"].as_f64() > Some(0.0));
    assert!(report["pss_mib_per_node"].as_f64() > Some(0.0));
    assert_sensors_scored(&report);

    let (dom, green, _) = open_in_chromium(dir.path());
    for shown in [
        "id=\"topology\"",
        "id=\"timeline\"",
        "gw-4-3-7",
        "site3-server-2",
        "cell-2-2",
        "passed",
    ] {
        assert!(
            dom.contains(shown),
            "{shown} is not in the page Chromium rendered"
        );
    }
    // The segmented plant's faults are seen by a node's few linked peers, so its
    // timeline's spans are pale (the shade says how many of the 99 saw it): no red to
    // count, only the running nodes' green.
    assert!(green > 500, "green {green} px in the screenshot");
}

/// The node processes whose working folder is under `dir`.
fn nodes_running_under(dir: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
        })
        .collect()
}

/// Regression: a `fogmesh sim` stopped by a signal left every node process running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulation_stopped_by_sigterm_takes_its_nodes_with_it() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let dir = dir.path().canonicalize().expect("a real path");
    let mut sim = Command::new(fogmesh_binary())
        .arg("sim")
        .arg(scenario("reliability.toml"))
        .arg("--out")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("fogmesh sim starts");
    crate::fixtures::poll("the four nodes to run", crate::fixtures::LONG, || async {
        (nodes_running_under(&dir).len() == 4).then_some(())
    })
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &sim.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let exit = sim.wait().expect("fogmesh sim exits");
    assert!(!exit.success(), "a stopped run is not a passed run");
    crate::fixtures::poll("no node process left", crate::fixtures::LONG, || async {
        nodes_running_under(&dir).is_empty().then_some(())
    })
    .await;
}
