//! The lab's guest agent (installed in the guest by the payload, started by kup-lab-agent.service).

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let token = std::fs::read_to_string(kup_lab::GUEST_TOKEN_PATH).with_context(|| {
        format!(
            "cannot read {}: was the payload installed?",
            kup_lab::GUEST_TOKEN_PATH
        )
    })?;
    kup_lab::agent::serve(kup_lab::AGENT_PORT, token.trim().to_owned())
}
