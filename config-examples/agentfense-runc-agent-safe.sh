#!/bin/sh
# agentfense-runc with the administrator's settings of runtime-presets/agent-safe.json (default
# policy agent-safe, secrets hidden whatever a container asks): for engines that can name a
# runtime binary but not give it arguments (nerdctl --runtime, ctr --runc-binary, a containerd
# runtime handler's BinaryName). Install as /usr/local/bin/agentfense-runc-agent-safe, the
# settings as /etc/agentfense/agent-safe.json.
exec /usr/local/bin/agentfense-runc --agentfense-config /etc/agentfense/agent-safe.json "$@"
