//! The zoo's networks against their references, in one test binary (each links libtorch
//! once): continual fine-tuning and its gate, the forecaster on TEP recordings, MiniLM
//! against sentence-transformers, and TorchScript models against PyTorch.

mod continual;
mod forecaster_tep;
mod minilm;
mod torchscript;
