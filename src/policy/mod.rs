//! Policy engine (SPEC §2–3): rules, presets, matcher, admin floor, explain. Pure: no I/O, no unsafe.
