"""spotstart inside other programs: plugins that serving engines load (``vllm``: the
``--load-format spotstart`` model loader). Each module imports its engine only when the
engine calls it; importing this package costs nothing."""
