"""The Pulumi stack: its config keys (config), the names it gives what it creates (names), and the
engine that runs it through Pulumi's Automation API (automation). Imports paths, errors and local."""
