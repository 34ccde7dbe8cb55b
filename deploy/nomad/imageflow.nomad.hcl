# ImageFlow on Nomad: control plane, tool services and Triton on a GPU client (nvidia device plugin).
job "imageflow" {
  datacenters = ["dc1"]

  group "control-plane" {
    network { port "grpc" { static = 50051 } }
    task "imageflow-server" {
      driver = "docker"
      config { image = "imageflow:0.1.0" ports = ["grpc"] }
      env {
        IMAGEFLOW_DATABASE_URL     = "postgresql://imageflow@postgres.service.consul:5432/imageflow"
        IMAGEFLOW_EMBEDDED_TOOLS   = "false"
        IMAGEFLOW_TRITON_URL       = "triton.service.consul:8001"
        IMAGEFLOW_LLM_API_KEY_FILE = "/secrets/llm-api-key"
      }
      template {
        data        = "{{ with nomadVar \"nomad/jobs/imageflow\" }}{{ .llm_api_key }}{{ end }}"
        destination = "secrets/llm-api-key"
      }
      kill_timeout = "30s"
      service {
        name = "imageflow"
        port = "grpc"
        check { type = "grpc" interval = "10s" timeout = "2s" }
      }
    }
  }

  group "tools" {
    count = 2
    network {
      port "resize" { to = 50061 }
      port "filter" { to = 50062 }
      port "detection" { to = 50063 }
    }
    task "resize" {
      driver = "docker"
      config { image = "imageflow:0.1.0" entrypoint = ["imageflow-tool", "resize", "--port", "50061"] ports = ["resize"] }
      service { name = "imageflow-resize" port = "resize" check { type = "grpc" interval = "10s" timeout = "2s" } }
    }
    task "filter" {
      driver = "docker"
      config { image = "imageflow:0.1.0" entrypoint = ["imageflow-tool", "filter", "--port", "50062"] ports = ["filter"] }
      service { name = "imageflow-filter" port = "filter" check { type = "grpc" interval = "10s" timeout = "2s" } }
    }
    task "detection" {
      driver = "docker"
      config { image = "imageflow:0.1.0" entrypoint = ["imageflow-tool", "detection", "--port", "50063"] ports = ["detection"] }
      env { IMAGEFLOW_TRITON_URL = "triton.service.consul:8001" }
      service { name = "imageflow-detection" port = "detection" check { type = "grpc" interval = "10s" timeout = "2s" } }
    }
  }

  group "triton" {
    network {
      port "grpc" { static = 8001 }
      port "metrics" { static = 8002 }
    }
    task "tritonserver" {
      driver = "docker"
      config {
        image   = "nvcr.io/nvidia/tritonserver:24.10-py3"
        args    = ["tritonserver", "--model-repository=/models"]
        ports   = ["grpc", "metrics"]
        volumes = ["/opt/imageflow/deploy/triton/models:/models:ro"]
      }
      resources {
        device "nvidia/gpu" { count = 1 }
      }
      service { name = "triton" port = "grpc" check { type = "grpc" interval = "10s" timeout = "2s" } }
    }
  }
}
