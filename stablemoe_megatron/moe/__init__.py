"""MoE layers on megatron-core: routers (adapters over stablemoe_megatron.routing), the
all-to-all dispatcher, expert stacks, and the paper-layout MoE block. Importing this package
imports megatron-core; the settings dataclass lives in :mod:`stablemoe_megatron.moe.config`."""
