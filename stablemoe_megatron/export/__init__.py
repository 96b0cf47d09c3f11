"""Checkpoint conversion: inspect, reshard, export to safetensors, import back; a pure-torch model.

* :mod:`.names`           exported tensor names <-> megatron's global checkpoint keys
* :mod:`.schema`          config.json of an exported model
* :mod:`.safetensors_io`  streaming safetensors writer, zero-copy reader
* :mod:`.dist_reader`     read a torch_dist checkpoint one tensor at a time, no process group
* :mod:`.exporter`        torch_dist -> safetensors + config.json + tokenizer
* :mod:`.model`           ExportedGPT: runs an export with torch alone (logits, loss)
* :mod:`.inference`       perplexity and greedy generation with an ExportedGPT
* :mod:`.sharded`         import / reshard inside a process group (megatron's dist_checkpointing)
* :mod:`.summary`         what a checkpoint holds (convert_checkpoint inspect)
* :mod:`.convert`         import and reshard (top level; starts its own CPU process group)

The checkpoint format (file names, train state, atomic publishing) is
:mod:`stablemoe_megatron.checkpoint`'s; nothing here imports the trainer (:mod:`stablemoe_megatron.training`).
The command line is ``tools/convert_checkpoint.py`` (:mod:`stablemoe_megatron.cli.convert_checkpoint`).
Importing this package imports nothing beyond torch; megatron-core is imported by the functions
that need it.
"""
