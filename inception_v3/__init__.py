"""Inception v3 image classification served by BentoML.

The request's path, one module each: ``preprocessing`` (bytes to pixels),
``model`` (the TensorFlow graph), ``runner`` (the batched model worker),
``labels`` (scores to labels), ``api`` (the service's HTTP/gRPC schema),
``protocols`` (the other doors, one module each: TensorFlow Serving, the Open
Inference Protocol), ``guards`` (limits and errors in front of it all). ``settings`` reads the one configuration file.
"""
