//! The Tennessee Eastman plant as fogmesh sees it: which recorded measurements and
//! valve positions belong to which unit, so each unit becomes one sensor stream with
//! its own anomaly expert, the way a plant would instrument it.
//!
//! Names are the column names `tep-studio` gives the revised TEP model's XMEAS and XMV
//! variables (`scripts/make_tep_recordings.py` keeps them in the recordings). Each unit
//! also gets the analysers that sample its streams (reactor feed, purge gas, stripper
//! underflow): composition faults show there first. The agitator speed is left out: it
//! never moves in this operating mode.

use fogmesh_models::Recording;

/// One plant unit and its transmitters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlantUnit {
    pub name: &'static str,
    pub columns: &'static [&'static str],
}

pub const UNITS: [PlantUnit; 5] = [
    PlantUnit {
        name: "feeds",
        columns: &[
            "feed_A_flow",
            "feed_D_flow",
            "feed_E_flow",
            "feed_AC_flow",
            "a_feed_valve",
            "d_feed_valve",
            "e_feed_valve",
            "ac_feed_valve",
        ],
    },
    PlantUnit {
        name: "reactor",
        columns: &[
            "reactor_feed_flow",
            "reactor_pressure",
            "reactor_level",
            "reactor_temperature",
            "reactor_cooling_water_outlet_temperature_meas",
            "reactor_cooling_water_valve",
            "recycle_flow",
            "reactor_feed_A_concentration",
            "reactor_feed_B_concentration",
            "reactor_feed_C_concentration",
            "reactor_feed_D_concentration",
            "reactor_feed_E_concentration",
            "reactor_feed_F_concentration",
        ],
    },
    PlantUnit {
        name: "separator",
        columns: &[
            "separator_temperature",
            "separator_level",
            "separator_pressure",
            "separator_underflow",
            "condenser_cooling_water_outlet_temperature",
            "separator_underflow_valve",
            "separator_cooling_water_valve",
        ],
    },
    PlantUnit {
        name: "stripper",
        columns: &[
            "stripper_level",
            "stripper_pressure",
            "stripper_underflow",
            "stripper_temperature",
            "stripper_steam_flow",
            "stripper_underflow_valve",
            "stripper_steam_valve",
            "stripper_underflow_D_concentration",
            "stripper_underflow_E_concentration",
            "stripper_underflow_F_concentration",
            "stripper_underflow_G_concentration",
            "stripper_underflow_H_concentration",
        ],
    },
    PlantUnit {
        name: "compressor",
        columns: &[
            "compressor_work",
            "compressor_recycle_valve",
            "purge_flow",
            "purge_valve",
            "purge_A_concentration",
            "purge_B_concentration",
            "purge_C_concentration",
            "purge_D_concentration",
            "purge_E_concentration",
            "purge_F_concentration",
            "purge_G_concentration",
            "purge_H_concentration",
        ],
    },
];

impl PlantUnit {
    /// The unit's column indices in `recording`, or the first column it lacks.
    pub fn column_indices(&self, recording: &Recording) -> Result<Vec<usize>, &'static str> {
        self.columns
            .iter()
            .map(|name| recording.column_index(name).ok_or(*name))
            .collect()
    }
}
