//! MQTT ingest: a broker's `<topic_prefix>/ingest/<sensor id>` topics feed the node's
//! sensor streams, and every message is answered on `<topic_prefix>/ack/<sensor id>`.
//!
//! Protocol (QoS 1 both ways):
//! - in: `{"samples":[{"sequence":1,"timestamp_us":..,"values":[..]}]}`, one stream per
//!   message, the stream named by the topic's last level;
//! - out, accepted: `{"acked_through":..,"accepted":..,"duplicates":..}`;
//! - out, refused: `{"error":"<message>","sensor_id":".."}`, the message being the same
//!   text a gRPC producer gets (field, value, limit). Malformed JSON (including numbers
//!   beyond f32's range), a payload over `limits.max_message_bytes` and samples the
//!   stream refuses (wrong channel count, time going back) are answered this way and
//!   counted; none of them stops the connection.
//!
//! Delivery: the session is clean and messages are acknowledged to the broker on
//! receipt, so a message in flight when the connection drops is lost; the producer,
//! seeing no ack on the ack topic, resends, and sequence numbers make the resend safe
//! (accepted samples are acknowledged again as duplicates, never windowed twice). The
//! ack topic, not the broker's PUBACK, is the producer's proof of acceptance.
//!
//! Transport: MQTT over TLS (port 8883 by default), the node presenting its own
//! certificate and checking the broker's against `ca` (or the mesh CA) and the host
//! name, with `username` and the password from `password_file`; plaintext only with
//! `insecure = true`, logged as such at start.
//!
//! One task per broker polls rumqttc's event loop and handles each message inline:
//! messages of a topic reach the stream in the broker's order, and the node's answer
//! gates reading the next message (back-pressure on the broker instead of a queue).
//! Acks leave through `try_publish`, so the task never waits on the outgoing queue it
//! alone drains. When the broker goes away the event loop reports an error; the task
//! sleeps ([`RECONNECT`]: exponential backoff up to [`MAX_BACKOFF`], with jitter so
//! that the nodes a broker restart disconnected together do not reconnect together)
//! and polls again, which reconnects; the subscription is renewed on every connection.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, Publish, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::MqttBroker;
use crate::ingest::Ingestor;
use crate::telemetry;

/// First wait after a connection error; doubled per consecutive error.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts, before jitter.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The waits between reconnection attempts. Jitter adds up to the wait itself, so a
/// wait lies between the backoff and twice it.
const RECONNECT: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(MIN_BACKOFF)
    .with_max_delay(MAX_BACKOFF)
    .with_jitter()
    .without_max_times();
/// Requests (acks, subscriptions) the client may queue for the event loop.
const OUTGOING_QUEUE: usize = 256;
/// Incoming packets up to twice `max_message_bytes` (plus room for the topic) are read
/// and refused with an error ack; a larger one breaks the connection (rumqttc refuses
/// to read it), which the task survives by reconnecting.
const PACKET_HEADROOM: usize = 64 << 10;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long a stopping task keeps polling to send its DISCONNECT.
const DISCONNECT_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Serialize)]
struct ErrorAck<'a> {
    error: String,
    sensor_id: &'a str,
}

/// Where one connection reads and answers.
struct Topics {
    /// `<prefix>/ingest/`, followed by the sensor id.
    ingest: String,
    /// `<prefix>/ack/`, followed by the sensor id.
    ack: String,
    broker: String,
}

/// Runs ingest from one broker until `shutdown` is cancelled. (Alerts go out on a
/// connection of their own: [`crate::mqtt_alerts`].)
///
/// Cancel safety: cancel-safe in that every message is answered or left unread; a
/// cancelled task does not send its DISCONNECT, so the broker notices through the keep
/// alive instead. Prefer cancelling `shutdown`.
pub(crate) async fn run(
    broker: MqttBroker,
    node_name: String,
    index: usize,
    ingest: Ingestor,
    max_message_bytes: usize,
    shutdown: CancellationToken,
) {
    let config = &broker.config;
    let prefix = config.topic_prefix(&node_name);
    let topics = Topics {
        ingest: format!("{prefix}/ingest/"),
        ack: format!("{prefix}/ack/"),
        broker: format!("{}:{}", config.host, config.port()),
    };
    let filter = format!("{prefix}/ingest/+");
    let max_packet = max_message_bytes
        .saturating_mul(2)
        .saturating_add(PACKET_HEADROOM);
    let options = connect_options(&broker, config.client_id(&node_name, index), max_packet);
    let (client, mut events) = AsyncClient::new(options, OUTGOING_QUEUE);
    let mut backoff = RECONNECT.build();
    loop {
        let event = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = RECONNECT.build();
                tracing::info!(broker = %topics.broker, %filter, "connected to the mqtt broker");
                if let Err(e) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                    tracing::error!(broker = %topics.broker, error = %e, "cannot queue the ingest subscription");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    tracing::error!(broker = %topics.broker, %filter, "the broker refused the ingest subscription");
                }
            }
            Ok(Event::Incoming(Packet::Publish(message))) => {
                answer(&client, &ingest, &topics, message).await
            }
            Ok(_) => {}
            Err(e) => {
                metrics::counter!(telemetry::MQTT_CONNECTION_ERRORS, "broker" => topics.broker.clone()).increment(1);
                // Never exhausted (no max times); the cap stands in should that change.
                let wait = backoff.next().unwrap_or(MAX_BACKOFF);
                tracing::warn!(broker = %topics.broker, error = %e, retry_in = ?wait, "mqtt connection failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    // Best effort: tell the broker we are leaving so it drops the session at once.
    if client.try_disconnect().is_ok() {
        let sent = async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, sent).await;
    }
}

/// A clean session to `broker` as `client_id`: its TLS and credentials, the keep
/// alive, packets up to `max_packet` bytes both ways.
pub(crate) fn connect_options(
    broker: &MqttBroker,
    client_id: String,
    max_packet: usize,
) -> MqttOptions {
    let config = &broker.config;
    let mut options = MqttOptions::new(client_id, config.host.clone(), config.port());
    if let Some(tls) = &broker.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    if let Some(username) = &config.username {
        let password = broker
            .password
            .as_ref()
            .map_or("", |p| p.expose())
            .to_string();
        options.set_credentials(username.clone(), password);
    }
    options.set_keep_alive(KEEP_ALIVE);
    options.set_clean_session(true);
    options.set_max_packet_size(max_packet, max_packet);
    options
}

/// Pushes one message and publishes its ack or error.
async fn answer(client: &AsyncClient, ingest: &Ingestor, topics: &Topics, message: Publish) {
    let Some(sensor_id) = message.topic.strip_prefix(topics.ingest.as_str()) else {
        tracing::warn!(topic = %message.topic, "message outside the ingest topics; ignored");
        return;
    };
    let reply = match ingest.push_json(sensor_id, &message.payload).await {
        Ok(ack) => serde_json::to_vec(&ack),
        Err(e) => {
            tracing::debug!(sensor = %sensor_id, error = %e, "mqtt batch refused");
            serde_json::to_vec(&ErrorAck {
                error: e.to_string(),
                sensor_id,
            })
        }
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => {
            tracing::error!(sensor = %sensor_id, error = %e, "cannot encode the mqtt ack");
            return;
        }
    };
    let topic = format!("{}{sensor_id}", topics.ack);
    if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, reply) {
        metrics::counter!(telemetry::MQTT_ACKS_DROPPED, "broker" => topics.broker.clone())
            .increment(1);
        tracing::warn!(sensor = %sensor_id, error = %e, "mqtt ack dropped; the producer will resend");
    }
}
