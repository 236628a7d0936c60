//! Temporary cross-check against PyTorch; deleted after use.
use fogmesh_models::{ForecasterConfig, SplitMix64, TcnForecaster};
use tch::Device;
#[test]
fn dump() {
    for (name, hidden) in [("a", 32i64), ("b", 5)] {
        let config = ForecasterConfig {
            channels: 5,
            context: 20,
            horizon: 3,
            hidden,
            levels: 3,
            kernel: 3,
        };
        let model = TcnForecaster::new(config.clone(), Device::Cpu, 3).unwrap();
        let mut rng = SplitMix64::new(1);
        let x: Vec<f32> = (0..4 * config.context_len())
            .map(|_| rng.normal() as f32)
            .collect();
        let f = model.forecast(&x).unwrap();
        let (bytes, _) = model.to_safetensors().unwrap();
        std::fs::write(format!("/tmp/xcheck/{name}.safetensors"), bytes).unwrap();
        std::fs::write(
            format!("/tmp/xcheck/{name}.json"),
            format!("{{\"x\": {:?}, \"f\": {:?}, \"hidden\": {hidden}}}", x, f),
        )
        .unwrap();
    }
}
