"""convert-fp8: stream a BF16 Hugging Face checkpoint into a block-quantized FP8 checkpoint.

Every run takes one path: source -> plan -> quantize or decode -> write -> finalize and verify (validate, on a
loader). The modules stand on floors, the lowest last; a module imports from its own floor and those below it,
never from one above, and no import goes round in a circle (`tests/test_layout.py` reads every import, those
inside functions too, and holds them to this table):

    commands  cli, console, validate, doctor, demo
    run       convert
    publish   publish, publish_commit, publish_record, hub_commit
    check     finalize, verify, verify_data, verify_report
    write     lanes, decode, stripes, write, combine, output_dir, manifest, resume, card, watch
    plan      plan, transcode, presets
    dialects  dialects
    source    origin, reader, source, hub, arch, arch_process
    math      quantize, quantize_fast, dequantize_fast, kernels
    base      errors, configs, checksum

A name is a module or a package (`dialects`, `kernels`, `validate`), which stands on its floor whole.
"""

__version__ = "0.1.0"
