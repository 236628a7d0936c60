//! Channels-last activations for the models' convolutions.
//!
//! libtorch's CPU convolutions (oneDNN) compute on channels-last data. Handed the
//! default channel-major layout, they reorder input, output and gradients on every call,
//! and the channel-major max-pool and batch-norm kernels are not vectorised across
//! channels. So the convolutional models keep their activations channels-last from the
//! first convolution to the pooling: a sensor window `[N, C, L]` becomes a one-row image
//! `[N, C, 1, L]` stored time-major, and each 1-d convolution runs as a `1 × k` 2-d one.
//! Parameters keep their stored shapes (`[out, in, k]` for 1-d kernels), so safetensors
//! written before this layout load unchanged and outputs agree to float rounding. On one
//! thread this makes the time-series models train about 1.2–1.3× and the vision expert
//! about 1.6× faster (`fogmesh bench train`); cuDNN takes the same layout.

use tch::{nn, Kind, TchError, Tensor};

/// `[N, C, H, W]` as a view of a channels-last copy: the same shape and values, with
/// strides `[H·W·C, 1, W·C, C]`. Explicit strides rather than permute–contiguous–permute,
/// because with one channel that round trip leaves strides libtorch reads as
/// channel-major. Meant for inputs: its backward through `as_strided` is the slow
/// general one.
pub(crate) fn channels_last(x: &Tensor) -> Result<Tensor, TchError> {
    let size = x.size();
    let [n, c, h, w] = size.as_slice() else {
        return Err(TchError::Shape(format!(
            "channels_last takes [N, C, H, W], got {size:?}"
        )));
    };
    x.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_as_strided(
        [*n, *c, *h, *w],
        [h * w * c, 1, w * c, *c],
        None,
    )
}

/// Sensor windows `[N, C, L]` → `[N, C, 1, L]` channels-last, for [`conv_along_time`].
pub(crate) fn sequence(windows: &Tensor) -> Result<Tensor, TchError> {
    channels_last(&windows.f_unsqueeze(2)?)
}

/// A 1-d convolution with a `[out, in, k]` kernel over `[N, C, 1, L]` activations: zero
/// `padding` steps each side, `dilation` between taps.
pub(crate) fn conv_along_time(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: i64,
    dilation: i64,
) -> Result<Tensor, TchError> {
    x.f_conv2d(
        &weight.f_unsqueeze(2)?,
        bias,
        [1, 1],
        [0, padding],
        [1, dilation],
        1,
    )
}

/// The sensor trunk the fault classifier and the fusion expert share: two ReLU'd
/// same-length convolutions (odd kernels, padded by half their width) over `[N, C, L]`
/// windows, averaged over time into `[N, hidden]`.
pub(crate) fn pooled_sensor_features(
    windows: &Tensor,
    conv1: &nn::Conv1D,
    conv2: &nn::Conv1D,
) -> Result<Tensor, TchError> {
    let conv = |x: &Tensor, layer: &nn::Conv1D| {
        let width = layer.ws.size()[2];
        conv_along_time(x, &layer.ws, layer.bs.as_ref(), width / 2, 1)?.f_relu()
    };
    let hidden = conv(&conv(&sequence(windows)?, conv1)?, conv2)?;
    hidden.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn channels_last_keeps_values_and_gives_channels_last_strides() {
        for channels in [1, 3] {
            let x = Tensor::randn([2, channels, 4, 5], (Kind::Float, Device::Cpu));
            let y = channels_last(&x).expect("layout");
            assert!(y.equal(&x));
            assert_eq!(y.stride(), vec![20 * channels, 1, 5 * channels, channels]);
        }
        let err = channels_last(&Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)))
            .expect_err("2-d input");
        assert!(err.to_string().contains("[N, C, H, W]"), "{err}");
    }

    #[test]
    fn time_convolution_equals_conv1d() {
        tch::manual_seed(0);
        let windows = Tensor::randn([3, 8, 40], (Kind::Float, Device::Cpu));
        let weight = Tensor::randn([16, 8, 3], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([16], (Kind::Float, Device::Cpu));
        for (padding, dilation) in [(1, 1), (0, 4), (4, 2)] {
            let expected = windows.conv1d(&weight, Some(&bias), [1], [padding], [dilation], 1);
            let got = conv_along_time(
                &sequence(&windows).expect("layout"),
                &weight,
                Some(&bias),
                padding,
                dilation,
            )
            .expect("convolution")
            .squeeze_dim(2);
            let error = (&got - &expected).abs().max().double_value(&[]);
            assert!(
                error < 1e-4,
                "padding {padding} dilation {dilation}: {error}"
            );
        }
    }
}
