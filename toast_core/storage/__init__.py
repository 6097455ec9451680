"""Storage: what leaves the process and comes back. `checkpoints` saves and loads steering modules
(safetensors + JSON card, never unpickled), `storage_codec` is the compact encoding of whole-backbone
modules, `bundles` carries a finished run to another machine as one verified zip."""
