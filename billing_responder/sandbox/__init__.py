"""Local emulators of the Gmail and Stripe APIs, served over real HTTP on 127.0.0.1.

The real client libraries talk to them unchanged; tests and `billing-responder demo` use them so
nothing ever touches the internet.
"""
