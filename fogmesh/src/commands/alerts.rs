//! `fogmesh alerts`: a node's alerts on a terminal, read from its alert journal. Each
//! line carries the alert's cursor; `--follow` keeps watching, and when the connection
//! drops it reconnects (backoff up to 5 s) and resumes after the last cursor printed,
//! so nothing is missed or printed twice; alerts the node no longer keeps are said so.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use backon::{BackoffBuilder, ExponentialBuilder};
use fogmesh_cluster::dialer::Dialer;
use fogmesh_proto::inference_client::InferenceClient;
use fogmesh_proto::{Alert, AlertFilter};
use futures::StreamExt;

/// Without `--follow`: done once the node has sent nothing for this long.
const QUIET: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub struct AlertsArgs {
    /// The node's gRPC address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    node: String,
    #[command(flatten)]
    identity: super::identity::IdentityArgs,
    /// Only these sensor streams (repeat for several).
    #[arg(long = "sensor")]
    sensors: Vec<String>,
    /// The first cursor to show. Default: everything the node keeps, or with
    /// `--follow` only what comes from now on.
    #[arg(long)]
    from: Option<u64>,
    /// Keep watching, reconnecting and resuming after the last cursor shown.
    #[arg(long)]
    follow: bool,
    /// Every verdict, not only alerts (resumable on nodes with
    /// `[node.alerts] journal_verdicts = true`).
    #[arg(long)]
    all: bool,
}

pub async fn run(args: AlertsArgs) -> anyhow::Result<()> {
    let dialer = args.identity.dialer()?;
    let mut from = match (args.from, args.follow) {
        (Some(cursor), _) => Some(cursor),
        (None, true) => None,
        (None, false) => Some(1),
    };
    let mut backoff = reconnect();
    loop {
        let watched = watch(&dialer, &args, &mut from).await;
        match watched {
            Ok(()) if !args.follow => return Ok(()),
            Ok(()) => backoff = reconnect(),
            Err(e) if !args.follow => return Err(e),
            Err(e) => eprintln!("{e:#}; reconnecting"),
        }
        tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(5))).await;
    }
}

fn reconnect() -> backon::ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Prints alerts until the stream ends (or, without `--follow`, goes quiet); `from`
/// follows the last cursor printed.
async fn watch(dialer: &Dialer, args: &AlertsArgs, from: &mut Option<u64>) -> anyhow::Result<()> {
    let connected = dialer
        .channel(&args.node)
        .await
        .with_context(|| format!("connecting to the node at {}", args.node))?;
    let mut client = InferenceClient::new(connected.channel);
    let mut alerts = client
        .watch_alerts(AlertFilter {
            sensor_ids: args.sensors.clone(),
            include_normal: args.all,
            from_cursor: *from,
        })
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))
        .with_context(|| format!("watching the alerts of {}", args.node))?
        .into_inner();
    loop {
        let next = if args.follow {
            alerts.next().await
        } else {
            match tokio::time::timeout(QUIET, alerts.next()).await {
                Ok(next) => next,
                Err(_) => return Ok(()),
            }
        };
        let Some(alert) = next else {
            anyhow::bail!("{} ended the alert stream", args.node);
        };
        let alert = alert
            .map_err(|status| anyhow::anyhow!("{}", status.message()))
            .with_context(|| format!("watching the alerts of {}", args.node))?;
        println!("{}", line(&alert));
        if alert.cursor > 0 {
            *from = Some(alert.cursor + 1);
        }
    }
}

/// `#CURSOR  TIME  SENSOR  window N  score S  EXPERT@VERSION [class]…  [late T]`.
fn line(alert: &Alert) -> String {
    if let Some(gap) = &alert.gap {
        return format!(
            "#{}..#{}  {} entries no longer kept by the node (past its [node.alerts] retention)",
            gap.first_missed,
            gap.last_missed,
            gap.last_missed - gap.first_missed + 1
        );
    }
    // RFC 3339 stops at the year 9999; a producer's clock may not.
    const LAST_RFC3339_US: u64 = 253_402_300_799_000_000;
    let end_us = u64::try_from(alert.window_end_us)
        .unwrap_or(0)
        .min(LAST_RFC3339_US);
    let end = UNIX_EPOCH + Duration::from_micros(end_us);
    let experts: Vec<String> = alert
        .experts
        .iter()
        .map(|e| {
            let class = if e.class.is_empty() {
                String::new()
            } else {
                format!(" [{}]", e.class)
            };
            format!("{}@{}{}", e.expert, e.model_version, class)
        })
        .collect();
    let late = if alert.late_ms > 0 {
        format!("  late {:.1} s", alert.late_ms as f64 / 1000.0)
    } else {
        String::new()
    };
    let cursor = if alert.cursor > 0 {
        format!("#{}", alert.cursor)
    } else {
        "live".into()
    };
    format!(
        "{cursor}  {}  {}  window {}  score {:.2}  {}{late}",
        humantime::format_rfc3339_millis(end),
        alert.sensor_id,
        alert.window_sequence,
        alert.score,
        experts.join(" "),
    )
}
