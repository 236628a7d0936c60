//! MQTT alerts: the node's alerts published to a broker for the plant's SCADA or
//! historian, one topic per sensor, `<topic_prefix>/alerts/<sensor id>`, QoS 1 and
//! retained (a subscriber arriving later gets each sensor's last alert at once).
//!
//! The payload is the journaled verdict as JSON (`sensor_id`, `window_sequence`,
//! `start_us`, `end_us`, `score`, `anomalous`, `experts`, `late_ms`, ...) with its
//! journal `cursor`.
//!
//! Delivery: at least once, in journal order. The publisher reads the alert journal
//! from its own durable cursor (`mqtt:<host>:<port>/<prefix>` in the edge log's cursor
//! table), keeps at most [`IN_FLIGHT`] publications unacknowledged, and moves the
//! cursor past an alert only once the broker's PUBACK for it and for every alert
//! before it came. When the connection drops, or the node restarts, it publishes again
//! from the cursor: an alert the broker had but whose PUBACK was lost arrives twice
//! (the cursor in the payload tells them apart), none is skipped. A first start with
//! no cursor begins at the journal's end.
//!
//! One task per broker with `alerts = true`, on a connection of its own (client id
//! `<client id>-alerts`), so a slow alert subscriber never holds up ingest.

use std::collections::VecDeque;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use fogmesh_actors::JournaledVerdict;
use fogmesh_edge_log::EdgeLog;
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::MqttBroker;
use crate::mqtt::connect_options;
use crate::telemetry;

/// Alerts published and not yet acknowledged by the broker.
const IN_FLIGHT: usize = 64;
/// Largest alert payload: a verdict names its experts, a few hundred bytes each.
const MAX_PACKET: usize = 1 << 20;

const RECONNECT: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(5))
    .with_jitter()
    .without_max_times();

#[derive(Serialize)]
struct Payload<'a> {
    cursor: u64,
    #[serde(flatten)]
    verdict: &'a JournaledVerdict,
}

/// One alert on its way: its cursor, and the packet id once rumqttc sent it.
struct Publication {
    cursor: u64,
    pkid: Option<u16>,
    acked: bool,
}

/// Publishes the journal's alerts to one broker until `shutdown` is cancelled.
pub(crate) async fn run(
    broker: MqttBroker,
    node_name: String,
    index: usize,
    log: EdgeLog,
    shutdown: CancellationToken,
) {
    let config = &broker.config;
    let prefix = config.topic_prefix(&node_name);
    let where_to = format!("{}:{}", config.host, config.port());
    let name = format!("mqtt:{where_to}/{prefix}");
    let saved = match log.cursor(&name) {
        Ok(saved) => saved,
        Err(e) => {
            tracing::error!(broker = %where_to, error = %e, "cannot read the alert publisher's cursor; alerts are not published to this broker");
            return;
        }
    };
    let mut acked_to = saved.unwrap_or_else(|| log.journal_marks().borrow().next);
    if saved.is_none() {
        log.save_cursor(&name, acked_to);
    }
    let options = connect_options(
        &broker,
        format!("{}-alerts", config.client_id(&node_name, index)),
        MAX_PACKET,
    );
    let (mut client, mut events) = AsyncClient::new(options.clone(), IN_FLIGHT * 2);
    let mut marks = log.journal_marks();
    let mut backoff = RECONNECT.build();
    let mut connected = false;
    // Published from `acked_to` on; `next` is the first cursor not yet published.
    let mut in_flight: VecDeque<Publication> = VecDeque::new();
    let mut next = acked_to;
    loop {
        if connected && in_flight.len() < IN_FLIGHT {
            next = publish_page(&client, &log, &prefix, next, &mut in_flight, &where_to);
            if in_flight.is_empty() && next > acked_to {
                // Nothing but entries that are not alerts: past them.
                acked_to = next;
                log.save_cursor(&name, acked_to);
            }
        }
        let caught_up = marks.borrow_and_update().next <= next;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(broker = %where_to, from = acked_to, "publishing alerts to the mqtt broker");
                    backoff = RECONNECT.build();
                    connected = true;
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(p) = in_flight.iter_mut().find(|p| p.pkid.is_none()) {
                        p.pkid = Some(pkid);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(p) = in_flight.iter_mut().find(|p| p.pkid == Some(ack.pkid)) {
                        p.acked = true;
                    }
                    let before = acked_to;
                    while in_flight.front().is_some_and(|p| p.acked) {
                        if let Some(done) = in_flight.pop_front() {
                            acked_to = done.cursor + 1;
                        }
                    }
                    if in_flight.is_empty() {
                        acked_to = acked_to.max(next);
                    }
                    if acked_to != before {
                        log.save_cursor(&name, acked_to);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    metrics::counter!(telemetry::MQTT_CONNECTION_ERRORS, "broker" => where_to.clone()).increment(1);
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(broker = %where_to, error = %e, retry_in = ?wait, "mqtt alert connection failed; alerts wait in the journal");
                    // What was not acknowledged goes again, from the cursor, on a fresh
                    // client: rumqttc would otherwise resend its own unacknowledged
                    // publications too, and their PUBACKs could not be told from ours.
                    connected = false;
                    in_flight.clear();
                    next = acked_to;
                    (client, events) = AsyncClient::new(options.clone(), IN_FLIGHT * 2);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            },
            changed = marks.changed(), if connected && caught_up => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    let _ = client.try_disconnect();
}

/// Publishes the alerts from `next` on while there is room; the next cursor to read.
fn publish_page(
    client: &AsyncClient,
    log: &EdgeLog,
    prefix: &str,
    mut next: u64,
    in_flight: &mut VecDeque<Publication>,
    broker: &str,
) -> u64 {
    let room = IN_FLIGHT - in_flight.len();
    let page = match log.journal_page(next, room) {
        Ok(page) => page,
        Err(e) => {
            tracing::error!(%broker, error = %e, "cannot read the alert journal");
            return next;
        }
    };
    if next < page.mark.oldest {
        tracing::warn!(%broker, first = next, last = page.mark.oldest - 1, "alerts past the journal's retention were never published to the broker");
        next = page.mark.oldest;
    }
    for (cursor, bytes) in page.entries {
        let verdict = match JournaledVerdict::decode(&bytes) {
            Ok(verdict) if verdict.anomalous => verdict,
            Ok(_) => {
                next = cursor + 1;
                continue;
            }
            Err(e) => {
                tracing::warn!(%broker, cursor, error = %e, "a journal entry that does not decode; not published");
                next = cursor + 1;
                continue;
            }
        };
        let payload = match serde_json::to_vec(&Payload {
            cursor,
            verdict: &verdict,
        }) {
            Ok(payload) => payload,
            Err(e) => {
                tracing::error!(%broker, cursor, error = %e, "cannot encode the alert");
                next = cursor + 1;
                continue;
            }
        };
        let topic = format!("{prefix}/alerts/{}", verdict.sensor_id);
        if client
            .try_publish(topic, QoS::AtLeastOnce, true, payload)
            .is_err()
        {
            // The request queue is full: the rest waits for the next round.
            break;
        }
        in_flight.push_back(Publication {
            cursor,
            pkid: None,
            acked: false,
        });
        next = cursor + 1;
    }
    next
}
