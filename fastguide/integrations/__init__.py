"""Optional integrations: :mod:`fastguide.integrations.lightning` (a Lightning ``Callback``) and
:mod:`fastguide.integrations.hf` (a Hugging Face ``Trainer``). Each imports its framework when imported."""
