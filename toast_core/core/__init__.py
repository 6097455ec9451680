"""The core every layer builds on: `backbone` loads, freezes and hashes the one timm ViT; `forward` is
the one steered forward every method, view and run goes through; `device` is the device rule;
`stats` holds the confidence intervals every card and table reports."""
