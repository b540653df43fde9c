"""The order pipeline's plugins (installed as ``kafkaworkers_orders``)."""
