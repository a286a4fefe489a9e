//! The administrator's settings (`--agentfense-config FILE`).
