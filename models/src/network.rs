//! The template every tch network in the zoo follows: built from its config, a device
//! and a seed, its weights in one `VarStore`, and its weights as safetensors bytes and
//! back through the one checked writer and reader in [`crate::weights`].
//!
//! [`Network`] states the template once, as burn's `Module` and candle's model structs
//! do: a new network gets checked loading by implementing four methods, and generic
//! code (serving, merging, continual learning) can take any of them. Networks differ
//! only in how their errors name in-memory bytes ([`Network::WEIGHTS_ORIGIN`]). A network whose loading must differ (the
//! autoencoder names the first mismatched tensor in forward order) overrides the
//! provided method instead of copying it.
//!
//! The networks keep `config` and their weight I/O callable as inherent methods too
//! (`inherent_network_methods!` writes the forwarders once): the workspace calls
//! `ConvAutoencoder::from_safetensors` and friends without importing a trait.

use tch::{nn, Device};

use crate::error::ModelError;
use crate::weights;

/// A network of the zoo: sized by a config, its variables in one `VarStore` under
/// stable names, so its weights round-trip through safetensors bit for bit.
pub trait Network: Sized {
    /// The sizes that fix every tensor's name and shape.
    type Config;

    /// Names in-memory bytes (they have no path) in errors from
    /// [`Network::from_safetensors`].
    const WEIGHTS_ORIGIN: &'static str;

    /// A fresh network of `config` on `device`, initialised from `seed`.
    fn new(config: Self::Config, device: Device, seed: i64) -> Result<Self, ModelError>;

    fn config(&self) -> &Self::Config;

    /// Every variable, buffers such as batch-norm statistics included.
    fn var_store(&self) -> &nn::VarStore;

    /// Mutable because loading overwrites every variable in place.
    fn var_store_mut(&mut self) -> &mut nn::VarStore;

    /// The weights as safetensors bytes (f32, sorted by name, no metadata, so equal
    /// weights give equal bytes) and their sha256 as lowercase hex.
    fn to_safetensors(&self) -> Result<(Vec<u8>, String), ModelError> {
        weights::to_safetensors(self.var_store())
    }

    /// A network of `config` with the weights in `bytes` (written by
    /// [`Network::to_safetensors`], or by PyTorch's `safetensors.torch` from the same
    /// module tree), checked as [`weights::load_into`] does: the sha256 when
    /// `expected_sha256` is given (`HashMismatch`), every tensor the config implies
    /// (`MissingTensor`) with its shape (`TensorShape`), f32 and finite, and no other
    /// (`Weights`). A file of another config is refused, never half loaded.
    fn from_safetensors(
        config: Self::Config,
        bytes: &[u8],
        expected_sha256: Option<&str>,
        device: Device,
    ) -> Result<Self, ModelError> {
        // The seed is irrelevant: loading overwrites every initial value.
        let mut model = Self::new(config, device, 0)?;
        weights::load_into(
            model.var_store_mut(),
            bytes,
            expected_sha256,
            Self::WEIGHTS_ORIGIN,
        )?;
        Ok(model)
    }
}

/// Inherent `config`, `to_safetensors` and `from_safetensors` for a [`Network`], each
/// forwarding to the trait, so that callers across the workspace need not import it.
macro_rules! inherent_network_methods {
    ($network:ty, $config:ty) => {
        impl $network {
            /// The config this network was built with.
            pub fn config(&self) -> &$config {
                <Self as $crate::network::Network>::config(self)
            }

            /// See [`Network::to_safetensors`](crate::network::Network::to_safetensors).
            pub fn to_safetensors(&self) -> Result<(Vec<u8>, String), $crate::ModelError> {
                <Self as $crate::network::Network>::to_safetensors(self)
            }

            /// See
            /// [`Network::from_safetensors`](crate::network::Network::from_safetensors).
            pub fn from_safetensors(
                config: $config,
                bytes: &[u8],
                expected_sha256: Option<&str>,
                device: tch::Device,
            ) -> Result<Self, $crate::ModelError> {
                <Self as $crate::network::Network>::from_safetensors(
                    config,
                    bytes,
                    expected_sha256,
                    device,
                )
            }
        }
    };
}
pub(crate) use inherent_network_methods;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoencoder::{AutoencoderConfig, ConvAutoencoder};
    use crate::notes::{NoteClassifier, NoteClassifierConfig};

    /// Saves and reloads through the trait alone, as generic code sees a network.
    fn reloaded_sha<N: Network>(config: N::Config, model: &N) -> String
    where
        N::Config: Clone,
    {
        let (bytes, sha) = model.to_safetensors().unwrap();
        match N::from_safetensors(config.clone(), &bytes, Some("00"), Device::Cpu) {
            Err(ModelError::HashMismatch { origin, .. }) => assert_eq!(origin, N::WEIGHTS_ORIGIN),
            other => panic!("expected HashMismatch, got {:?}", other.err()),
        }
        let loaded = N::from_safetensors(config, &bytes, Some(&sha), Device::Cpu).unwrap();
        assert_eq!(loaded.to_safetensors().unwrap().1, sha);
        sha
    }

    #[test]
    fn the_trait_constructs_saves_and_loads_as_the_inherent_methods_do() {
        let config = NoteClassifierConfig {
            input: 6,
            hidden: 4,
            classes: 3,
        };
        let model = <NoteClassifier as Network>::new(config, Device::Cpu, 9).unwrap();
        let inherent = NoteClassifier::new(config, Device::Cpu, 9).unwrap();
        let sha = reloaded_sha(config, &model);
        assert_eq!(sha, inherent.to_safetensors().unwrap().1);
    }

    #[test]
    fn an_override_replaces_the_provided_loading_behind_the_trait() {
        let config = AutoencoderConfig::w1(3, 16);
        let model = <ConvAutoencoder as Network>::new(config.clone(), Device::Cpu, 1).unwrap();
        reloaded_sha(config.clone(), &model);
        let (bytes, _) = model.to_safetensors().unwrap();
        let wider = AutoencoderConfig {
            hidden: 40,
            ..config
        };
        // By name, `dec1.bias` would disagree first; in forward order it is `enc1.weight`.
        match <ConvAutoencoder as Network>::from_safetensors(wider, &bytes, None, Device::Cpu) {
            Err(ModelError::TensorShape { name, .. }) => assert_eq!(name, "enc1.weight"),
            other => panic!("expected TensorShape, got {:?}", other.err()),
        }
    }
}
