# What Kubernetes would tell the aggregator about the demo's "pods" and "nodes": the static
# metadata file (aggregator --metadata-file), for clusters without an API server to watch.
endpoint "10.201.1.2" { pod = "frontend-web-7d9f4" namespace = "frontend" node = "node-a" workload_kind = "Deployment" workload = "frontend-web" labels = { app = "web" } }
endpoint "10.201.1.3" { pod = "cache-0" namespace = "backend" node = "node-a" workload_kind = "StatefulSet" workload = "cache" service = "cache" }
endpoint "10.201.2.2" { pod = "nginx-5c8d7-x2k9q" namespace = "backend" node = "node-b" workload_kind = "Deployment" workload = "nginx" service = "nginx" container = "nginx" }
endpoint "10.201.1.1" { node = "node-a" }
endpoint "10.201.2.1" { node = "node-b" }
