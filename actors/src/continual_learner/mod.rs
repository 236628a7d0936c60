//! Continual learning: a [`ContinualLearner`] per learning expert keeps the expert's
//! stored model fitted to the plant as the plant drifts, and changes the version it
//! serves only when a candidate proves better.
//!
//! The parts: `spec` (the `[experts.learning]` settings and their checks), `observed`
//! (the recent windows and the replay reservoir the learner keeps), `round` (one
//! fine-tune, validate and store round, on a blocking thread), `promoter` (how a
//! validated version comes to serve), `shared` (the learner's observable state, phases,
//! round reports and errors, which the actor and a round both use) and `actor` (the
//! learner itself: its messages and drift detection).
//!
//! The life of a regime:
//! 1. **watching**: every window the expert gave an opinion on goes into the recent
//!    buffer (the newest `min_new_windows`); windows leaving it are offered to the
//!    reservoir. The detectors see the opinions of the serving version only.
//! 2. **drift**: either detector fires. The event is recorded (what drifted, when, old
//!    and new level, the statistic against its limit), the recent buffer is offered to
//!    the reservoir, which is then frozen as the old regime, and both detectors restart
//!    on the new regime (so one change raises one event, not one per detector).
//! 3. **collecting**: windows go to the recent buffer only (the newest
//!    `max_new_windows` kept). Once `min_new_windows` have come, a round starts.
//! 4. **a round** (also on the `every_s` schedule when `min_new_windows` came since the
//!    last one, or on command): a share (`holdout`) of the new windows (the newest:
//!    consecutive windows overlap) and of the reservoir (at random) is held out; a
//!    shadow copy of the serving version is fine-tuned on the rest with replay and EWC
//!    ([`fine_tune`]) on a blocking thread with one libtorch thread
//!    (**fine_tuning**); incumbent and candidate are evaluated on both held-out sets and
//!    the gate judges (**validating**). Refused: counted, nothing stored. Promoted: the
//!    candidate is stored as the next version (parent: the incumbent; metrics: its
//!    recalibrated threshold and the gate figures; training: the round), then handed to
//!    the [`Promoter`] (**promoting**). Once it serves, the recent windows join the
//!    reservoir, the detectors restart on the new version's scores, and the learner
//!    watches again. A refused or failed round keeps collecting; the next drift-driven
//!    round waits for another `min_new_windows`. A drift during a round leaves the
//!    round to finish on its copy of the windows and starts collecting the newer
//!    regime, which a promotion then does not end.
//!
//! [`fine_tune`]: fogmesh_models::continual::fine_tune

mod actor;
mod observed;
mod promoter;
mod round;
mod shared;
mod spec;

pub use actor::{
    ContinualLearner, ContinualLearnerArgs, ContinualLearnerMsg, ContinualLearnerState,
    RunningLearner, MAX_PENDING_WINDOWS,
};
pub use promoter::{BoxFuture, LocalPromoter, PromoteError, Promoter};
pub use round::{RoundDone, MIN_OLD_WINDOWS};
pub use shared::{
    ContinualLearnerShared, DriftEvent, FineTuneFailure, LearnerError, LearnerSnapshot, Phase,
    RoundReport, StoreFailure, Trigger,
};
pub use spec::{DriftSpec, InvalidLearning, LearningSpec, MAX_HELD_WINDOWS};
