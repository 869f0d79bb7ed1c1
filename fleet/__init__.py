"""The workstation's fleet tools: keys and signatures (``yugami-keys``), and ``yugami-fleet`` (status,
push, collect, serve) talking to the boxes over MQTT. No TensorFlow; imports the agent's topic and
bundle code, never the reverse."""
