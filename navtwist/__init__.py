"""navtwist: a streaming egress proxy for AI-agent sandboxes."""
