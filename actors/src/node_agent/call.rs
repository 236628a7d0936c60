//! Asking an actor of the node and waiting a bounded time: the one place that turns
//! ractor's ways of not answering (timeout, callee stopped, message not delivered) into
//! an answer. The `Node` handle and the node agent both ask through here, so neither
//! depends on the other for it.

use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};

/// How long a caller waits for a sensor stream, router, expert or the agent to answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an actor of the node gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unanswered {
    #[error("no {answer} within {after:?}")]
    Timeout {
        answer: &'static str,
        after: Duration,
    },
    #[error("the {callee} stopped before answering")]
    Stopped { callee: &'static str },
    /// ractor could not deliver the message.
    #[error("the {callee} could not be asked: {source}")]
    NotDelivered {
        callee: &'static str,
        #[source]
        source: Undelivered,
    },
}

/// Why ractor could not deliver a message: its `MessagingErr` without the message it
/// holds, so that it can be cloned and compared like the errors that carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Undelivered {
    #[error("the actor's mailbox is closed: the actor is likely stopped")]
    MailboxClosed,
    #[error("the channel is closed")]
    ChannelClosed,
    #[error("the actor is not of the type the message is for")]
    WrongActorType,
}

impl<T> From<&ractor::MessagingErr<T>> for Undelivered {
    fn from(error: &ractor::MessagingErr<T>) -> Self {
        match error {
            ractor::MessagingErr::SendErr(_) => Undelivered::MailboxClosed,
            ractor::MessagingErr::ChannelClosed => Undelivered::ChannelClosed,
            ractor::MessagingErr::InvalidActorType => Undelivered::WrongActorType,
        }
    }
}

/// Asks an actor and waits at most [`CALL_TIMEOUT`], folding ractor's ways of not
/// answering (timeout, callee stopped, message not delivered) into the callee's own
/// error; `(answer, callee)` name them, e.g. ("verdict", "router").
pub(super) async fn ask<M, T, E>(
    actor: &ActorRef<M>,
    message: impl FnOnce(RpcReplyPort<Result<T, E>>) -> M,
    names: (&'static str, &'static str),
    unavailable: impl Fn(Unanswered) -> E,
) -> Result<T, E>
where
    M: ractor::Message,
    T: Send + 'static,
    E: Send + 'static,
{
    call(actor, message, names)
        .await
        .unwrap_or_else(|unanswered| Err(unavailable(unanswered)))
}

/// [`ask`] for a caller whose error differs from the callee's: the callee's answer as
/// it came, or why there was none.
pub(super) async fn call<M, T>(
    actor: &ActorRef<M>,
    message: impl FnOnce(RpcReplyPort<T>) -> M,
    names: (&'static str, &'static str),
) -> Result<T, Unanswered>
where
    M: ractor::Message,
    T: Send + 'static,
{
    call_within(actor, message, names, CALL_TIMEOUT).await
}

/// [`call`] waiting at most `timeout` (a federated round's deadline).
pub(crate) async fn call_within<M, T>(
    actor: &ActorRef<M>,
    message: impl FnOnce(RpcReplyPort<T>) -> M,
    (answer, callee): (&'static str, &'static str),
    timeout: Duration,
) -> Result<T, Unanswered>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(message, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(answer)) => Ok(answer),
        Ok(ractor::rpc::CallResult::Timeout) => Err(Unanswered::Timeout {
            answer,
            after: timeout,
        }),
        Ok(ractor::rpc::CallResult::SenderError) => Err(Unanswered::Stopped { callee }),
        Err(e) => Err(Unanswered::NotDelivered {
            callee,
            source: Undelivered::from(&e),
        }),
    }
}
