//! TEMPORARY stub until the real SSA module lands.
use crate::resources::ResourceType;
use serde_json::Value;
#[derive(Debug, Clone, thiserror::Error)]
pub enum SsaError {
    #[error("conflicts")]
    Conflicts(Vec<Conflict>),
    #[error("{0}")]
    Invalid(String),
}
#[derive(Debug, Clone)]
pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    pub field: String,
}
pub fn apply(
    _rt: &ResourceType,
    live: Option<&Value>,
    config: &Value,
    _manager: &str,
    _sub: Option<&str>,
    _force: bool,
    _now: &str,
) -> Result<Value, SsaError> {
    Ok(match live {
        Some(l) => crate::patch::merge_patch(l, config),
        None => config.clone(),
    })
}
pub fn record_update(
    _rt: &ResourceType,
    _old: Option<&Value>,
    _new: &mut Value,
    _manager: &str,
    _sub: Option<&str>,
    _now: &str,
) {
}
