//! Asking an actor of the node and waiting a bounded time: the one place that turns
//! ractor's ways of not answering (timeout, callee stopped, message not delivered) into
//! an answer. The `Node` handle and the node agent both ask through here, so neither
//! depends on the other for it.

use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};

/// How long a caller waits for a sensor stream, router, expert or the agent to answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks an actor and waits at most [`CALL_TIMEOUT`], folding ractor's ways of not
/// answering (timeout, callee stopped, message not delivered) into the callee's own
/// error; `(answer, callee)` name them in the reason, e.g. ("verdict", "router").
pub(super) async fn ask<M, T, E>(
    actor: &ActorRef<M>,
    message: impl FnOnce(RpcReplyPort<Result<T, E>>) -> M,
    names: (&str, &str),
    unavailable: impl Fn(String) -> E,
) -> Result<T, E>
where
    M: ractor::Message,
    T: Send + 'static,
    E: Send + 'static,
{
    call(actor, message, names)
        .await
        .unwrap_or_else(|reason| Err(unavailable(reason)))
}

/// [`ask`] for a caller whose error differs from the callee's: the callee's answer as
/// it came, or why there was none.
pub(super) async fn call<M, T>(
    actor: &ActorRef<M>,
    message: impl FnOnce(RpcReplyPort<T>) -> M,
    (answer, callee): (&str, &str),
) -> Result<T, String>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(message, Some(CALL_TIMEOUT)).await {
        Ok(ractor::rpc::CallResult::Success(answer)) => Ok(answer),
        Ok(ractor::rpc::CallResult::Timeout) => Err(format!("no {answer} within {CALL_TIMEOUT:?}")),
        Ok(ractor::rpc::CallResult::SenderError) => {
            Err(format!("the {callee} stopped before answering"))
        }
        Err(e) => Err(e.to_string()),
    }
}
