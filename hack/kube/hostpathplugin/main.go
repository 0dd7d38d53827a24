// hostpathplugin: a small CSI driver for hoard's test control plane (hack/kube).
//
// It stands in for kubernetes-csi/csi-driver-host-path, whose Go module the module proxy
// here does not serve. It keeps that driver's command line (the subset hack/kube uses) and
// its on-disk layout, so tests can look at volumes and snapshots directly:
//
//	<statedir>/<volume id>/        a volume is a plain directory (volume id = PV.spec.csi.volumeHandle)
//	<statedir>/<snapshot id>.snap  a snapshot is a gzip'd tar of that directory, taken at CreateSnapshot
//	<statedir>/state.json          the list of volumes and snapshots (survives restarts)
//
// Controller RPCs: CreateVolume (empty, from a snapshot, or cloned from a volume), DeleteVolume,
// CreateSnapshot, DeleteSnapshot, ListSnapshots, ValidateVolumeCapabilities, plus Identity.
// Node RPCs (used when a real kubelet runs, `up.sh --with-node`): NodeGetInfo; NodeStageVolume
// bind-mounts the volume's directory at the kubelet's staging path, NodePublishVolume the
// staged mount at the pod's target path (read-only when asked); the Unstage/Unpublish pair
// undoes them. Filesystem volumes only. Archives
// are written and read with Go's archive/tar, so no external tar is needed.
//
// With --kubelet-registration-dir it also registers itself with the kubelet the way
// node-driver-registrar does (that module is not served here either): a
// pluginregistration.v1 Registration service on <dir>/<driver>-reg.sock whose GetInfo names
// the CSI endpoint.
//
// Built by hack/kube/build.sh inside its throwaway module; not part of hoard itself.
package main

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const vendorVersion = "hoard-hostpath-1"

// Field names follow csi-driver-host-path's state.json, so either driver's file reads the same.
type volume struct {
	VolName       string
	VolID         string
	VolSize       int64
	VolPath       string
	VolAccessType string
	ParentVolID   string `json:",omitempty"`
	ParentSnapID  string `json:",omitempty"`
	NodeID        string
	Kind          string `json:",omitempty"`
}

type timestamp struct {
	Seconds int64 `json:"seconds"`
	Nanos   int32 `json:"nanos"`
}

type snapshot struct {
	Name         string
	Id           string
	VolID        string
	Path         string
	CreationTime timestamp
	SizeBytes    int64
	ReadyToUse   bool
}

type resources struct {
	Volumes   []volume
	Snapshots []snapshot
}

type driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer

	name, nodeID, stateDir string

	// One lock for everything: operations are few and tests want them serialised.
	mu    sync.Mutex
	state resources
}

func main() {
	endpoint := flag.String("endpoint", "unix:///csi/csi.sock", "CSI endpoint (unix://PATH)")
	name := flag.String("drivername", "hostpath.csi.k8s.io", "name of the driver")
	nodeID := flag.String("nodeid", "", "node id (required)")
	stateDir := flag.String("statedir", "", "directory for volumes, snapshots and state.json (required)")
	showVersion := flag.Bool("version", false, "print the version and exit")
	registrationDir := flag.String("kubelet-registration-dir", "", "the kubelet's plugins_registry directory; empty: do not register")
	flag.Parse()
	if *showVersion {
		fmt.Println(filepath.Base(os.Args[0]), vendorVersion)
		return
	}
	if *nodeID == "" || *stateDir == "" {
		log.Fatal("--nodeid and --statedir are required")
	}
	sock, err := socketPath(*endpoint)
	if err != nil {
		log.Fatal(err)
	}

	d := &driver{name: *name, nodeID: *nodeID, stateDir: *stateDir}
	if err := os.MkdirAll(d.stateDir, 0o750); err != nil {
		log.Fatal(err)
	}
	if err := d.load(); err != nil {
		log.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(sock), 0o750); err != nil {
		log.Fatal(err)
	}
	// A socket left by a killed run would make Listen fail.
	if err := os.Remove(sock); err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.Fatal(err)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatal(err)
	}

	srv := grpc.NewServer(grpc.UnaryInterceptor(logCalls))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterControllerServer(srv, d)
	csi.RegisterNodeServer(srv, d)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		log.Printf("%v: stopping", s)
		done := make(chan struct{})
		go func() { srv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			srv.Stop()
		}
	}()

	var regSrv *grpc.Server
	if *registrationDir != "" {
		regSrv, err = register(*registrationDir, d.name, sock)
		if err != nil {
			log.Fatal(err)
		}
	}

	log.Printf("driver %s (node %s, %s) serving on %s, state in %s", d.name, d.nodeID, vendorVersion, sock, d.stateDir)
	err = srv.Serve(lis)
	if regSrv != nil {
		regSrv.Stop()
	}
	_ = os.Remove(sock)
	if err != nil {
		log.Fatal(err)
	}
}

func socketPath(endpoint string) (string, error) {
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme != "unix" {
		return "", fmt.Errorf("--endpoint must be unix://PATH, got %q", endpoint)
	}
	p := u.Path
	if u.Host != "" { // unix://relative/path
		p = u.Host + p
	}
	if p == "" {
		return "", fmt.Errorf("--endpoint %q has no path", endpoint)
	}
	return p, nil
}

func logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	resp, err := h(ctx, req)
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	switch {
	case err != nil:
		log.Printf("%s %v: error: %v", method, compact(req), err)
	case method != "Probe" && method != "GetPluginInfo" && method != "GetPluginCapabilities" &&
		method != "ControllerGetCapabilities" && method != "NodeGetCapabilities":
		log.Printf("%s %v: ok", method, compact(req))
	}
	return resp, err
}

// compact drops secrets from the logged request.
func compact(req any) string {
	if r, ok := req.(interface{ GetSecrets() map[string]string }); ok && len(r.GetSecrets()) > 0 {
		return "{secrets redacted}"
	}
	return fmt.Sprintf("%v", req)
}

// --- state ------------------------------------------------------------------------------------

func (d *driver) statePath() string { return filepath.Join(d.stateDir, "state.json") }

func (d *driver) load() error {
	b, err := os.ReadFile(d.statePath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return json.Unmarshal(b, &d.state)
}

// save writes state.json atomically (temp file + rename).
func (d *driver) save() error {
	b, err := json.MarshalIndent(&d.state, "", "  ")
	if err != nil {
		return err
	}
	tmp := d.statePath() + ".tmp"
	if err := os.WriteFile(tmp, b, 0o640); err != nil {
		return err
	}
	return os.Rename(tmp, d.statePath())
}

func (d *driver) volumeByID(id string) (int, *volume) {
	for i := range d.state.Volumes {
		if d.state.Volumes[i].VolID == id {
			return i, &d.state.Volumes[i]
		}
	}
	return -1, nil
}

func (d *driver) volumeByName(name string) *volume {
	for i := range d.state.Volumes {
		if d.state.Volumes[i].VolName == name {
			return &d.state.Volumes[i]
		}
	}
	return nil
}

func (d *driver) snapshotByID(id string) (int, *snapshot) {
	for i := range d.state.Snapshots {
		if d.state.Snapshots[i].Id == id {
			return i, &d.state.Snapshots[i]
		}
	}
	return -1, nil
}

func (d *driver) snapshotByName(name string) *snapshot {
	for i := range d.state.Snapshots {
		if d.state.Snapshots[i].Name == name {
			return &d.state.Snapshots[i]
		}
	}
	return nil
}

func newID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40 // version 4
	b[8] = b[8]&0x3f | 0x80 // RFC 4122 variant
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// --- identity ---------------------------------------------------------------------------------

func (d *driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: d.name, VendorVersion: vendorVersion}, nil
}

func (d *driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	// No VOLUME_ACCESSIBILITY_CONSTRAINTS: the control plane may run without a kubelet (no CSINode), and
	// PVs without node affinity are simpler for tests.
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{{
		Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{
			Type: csi.PluginCapability_Service_CONTROLLER_SERVICE,
		}},
	}}}, nil
}

func (d *driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{}, nil
}

// --- kubelet plugin registration ---------------------------------------------------------------

// registration answers the kubelet's plugin watcher, as node-driver-registrar does.
type registration struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
}

func (r *registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type: registerapi.CSIPlugin, Name: r.name, Endpoint: r.endpoint, SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registration) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		log.Printf("kubelet registered %s", r.name)
	} else {
		log.Printf("kubelet refused %s: %s", r.name, s.Error)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// register serves the Registration service on <dir>/<name>-reg.sock; the kubelet finds it there.
func register(dir, name, endpoint string) (*grpc.Server, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, name+"-reg.sock")
	if err := os.Remove(sock); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		return nil, err
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, &registration{name: name, endpoint: endpoint})
	go func() {
		if err := srv.Serve(lis); err != nil {
			log.Printf("registration socket: %v", err)
		}
		_ = os.Remove(sock)
	}()
	log.Printf("registration socket %s", sock)
	return srv, nil
}

// --- node: stage = bind mount of the volume directory, publish = bind mount of the stage -------

func (d *driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.nodeID}, nil
}

func (d *driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{Capabilities: []*csi.NodeServiceCapability{{
		Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{
			Type: csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		}},
	}}}, nil
}

// isMountPoint: path is the root of a mount (its device differs from its parent's, or
// /proc/self/mountinfo lists it: a bind mount of a directory on the same device).
func isMountPoint(path string) (bool, error) {
	clean := filepath.Clean(path)
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && unescapeMountPath(f[4]) == clean {
			return true, nil
		}
	}
	return false, nil
}

func unescapeMountPath(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// bindMount mounts src at target (created if missing), read-only when asked; a target that
// is already a mount point is left as it is (the kubelet retries after timeouts).
func bindMount(src, target string, readOnly bool) error {
	if err := os.MkdirAll(target, 0o750); err != nil {
		return status.Errorf(codes.Internal, "target %s: %v", target, err)
	}
	mounted, err := isMountPoint(target)
	if err != nil {
		return status.Errorf(codes.Internal, "mountinfo: %v", err)
	}
	if mounted {
		return nil
	}
	if err := syscall.Mount(src, target, "", syscall.MS_BIND, ""); err != nil {
		return status.Errorf(codes.Internal, "bind mount %s on %s: %v", src, target, err)
	}
	if readOnly {
		flags := uintptr(syscall.MS_BIND | syscall.MS_REMOUNT | syscall.MS_RDONLY)
		if err := syscall.Mount("", target, "", flags, ""); err != nil {
			_ = syscall.Unmount(target, 0)
			return status.Errorf(codes.Internal, "read-only remount of %s: %v", target, err)
		}
	}
	return nil
}

// unmount undoes bindMount; with remove, the target directory goes too (publish targets).
func unmount(target string, remove bool) error {
	mounted, err := isMountPoint(target)
	if err != nil {
		return status.Errorf(codes.Internal, "mountinfo: %v", err)
	}
	if mounted {
		if err := syscall.Unmount(target, 0); err != nil {
			return status.Errorf(codes.Internal, "unmount %s: %v", target, err)
		}
	}
	if remove {
		if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return status.Errorf(codes.Internal, "remove %s: %v", target, err)
		}
	}
	return nil
}

// NodeStageVolume mounts the volume's directory at the node-wide staging path.
func (d *driver) NodeStageVolume(_ context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if id == "" || staging == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id and staging target path are required")
	}
	if req.GetVolumeCapability().GetMount() == nil {
		return nil, status.Error(codes.InvalidArgument, "only filesystem volumes are supported")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	_, v := d.volumeByID(id)
	if v == nil {
		return nil, status.Errorf(codes.NotFound, "volume %s not found", id)
	}
	if err := bindMount(v.VolPath, staging, false); err != nil {
		return nil, err
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

func (d *driver) NodeUnstageVolume(_ context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	if req.GetVolumeId() == "" || req.GetStagingTargetPath() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id and staging target path are required")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := unmount(req.GetStagingTargetPath(), false); err != nil {
		return nil, err
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// NodePublishVolume bind-mounts the staged volume at the pod's target path.
func (d *driver) NodePublishVolume(_ context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, staging, target := req.GetVolumeId(), req.GetStagingTargetPath(), req.GetTargetPath()
	if id == "" || target == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id and target path are required")
	}
	if req.GetVolumeCapability().GetMount() == nil {
		return nil, status.Error(codes.InvalidArgument, "only filesystem volumes are supported")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, v := d.volumeByID(id); v == nil {
		return nil, status.Errorf(codes.NotFound, "volume %s not found", id)
	}
	staged, err := isMountPoint(staging)
	if err != nil || staging == "" || !staged {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged at %q", id, staging)
	}
	if err := bindMount(staging, target, req.GetReadonly()); err != nil {
		return nil, err
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *driver) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	target := req.GetTargetPath()
	if req.GetVolumeId() == "" || target == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id and target path are required")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := unmount(target, true); err != nil {
		return nil, err
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// --- controller -------------------------------------------------------------------------------

func (d *driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, c := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{
			Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: c}},
		})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

func checkCapabilities(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities missing")
	}
	for _, c := range caps {
		if c.GetBlock() != nil {
			return status.Error(codes.InvalidArgument, "block volumes are not supported by this driver")
		}
	}
	return nil
}

func sameSource(a, b *csi.VolumeContentSource) bool {
	return a.GetSnapshot().GetSnapshotId() == b.GetSnapshot().GetSnapshotId() &&
		a.GetVolume().GetVolumeId() == b.GetVolume().GetVolumeId()
}

func (d *driver) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "name missing")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	size := req.GetCapacityRange().GetRequiredBytes()
	if size == 0 {
		size = req.GetCapacityRange().GetLimitBytes()
	}
	src := req.GetVolumeContentSource()

	d.mu.Lock()
	defer d.mu.Unlock()

	// Idempotent by name: the provisioner retries after timeouts.
	if v := d.volumeByName(req.GetName()); v != nil {
		origin := &csi.VolumeContentSource{}
		if v.ParentSnapID != "" {
			origin = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: v.ParentSnapID}}}
		} else if v.ParentVolID != "" {
			origin = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
				Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.ParentVolID}}}
		}
		if v.VolSize < size || !sameSource(origin, src) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with another size or source", req.GetName())
		}
		return &csi.CreateVolumeResponse{Volume: &csi.Volume{
			VolumeId: v.VolID, CapacityBytes: v.VolSize, VolumeContext: req.GetParameters(), ContentSource: src,
		}}, nil
	}

	v := volume{
		VolName: req.GetName(), VolID: newID(), VolSize: size, VolAccessType: "mount",
		NodeID: d.nodeID, Kind: req.GetParameters()["kind"],
	}
	v.VolPath = filepath.Join(d.stateDir, v.VolID)

	// Check the source before creating anything.
	var fill func() error
	switch {
	case src.GetSnapshot() != nil:
		_, s := d.snapshotByID(src.GetSnapshot().GetSnapshotId())
		if s == nil {
			return nil, status.Errorf(codes.NotFound, "source snapshot %q not found", src.GetSnapshot().GetSnapshotId())
		}
		if s.SizeBytes > size {
			return nil, status.Errorf(codes.OutOfRange, "snapshot %s is %d bytes, larger than the requested %d", s.Id, s.SizeBytes, size)
		}
		v.ParentSnapID = s.Id
		archive := s.Path
		fill = func() error { return extractArchive(archive, v.VolPath) }
	case src.GetVolume() != nil:
		_, p := d.volumeByID(src.GetVolume().GetVolumeId())
		if p == nil {
			return nil, status.Errorf(codes.NotFound, "source volume %q not found", src.GetVolume().GetVolumeId())
		}
		if p.VolSize > size {
			return nil, status.Errorf(codes.OutOfRange, "volume %s is %d bytes, larger than the requested %d", p.VolID, p.VolSize, size)
		}
		v.ParentVolID = p.VolID
		from := p.VolPath
		fill = func() error { return copyTree(from, v.VolPath) }
	}

	if err := os.Mkdir(v.VolPath, 0o777); err != nil {
		return nil, status.Errorf(codes.Internal, "create volume directory: %v", err)
	}
	// The directory is world-writable like upstream's, so tests running as any user can fill it.
	if err := os.Chmod(v.VolPath, 0o777); err != nil {
		return nil, status.Errorf(codes.Internal, "chmod volume directory: %v", err)
	}
	if fill != nil {
		if err := fill(); err != nil {
			_ = os.RemoveAll(v.VolPath)
			return nil, status.Errorf(codes.Internal, "fill volume from its source: %v", err)
		}
	}
	d.state.Volumes = append(d.state.Volumes, v)
	if err := d.save(); err != nil {
		d.state.Volumes = d.state.Volumes[:len(d.state.Volumes)-1]
		_ = os.RemoveAll(v.VolPath)
		return nil, status.Errorf(codes.Internal, "save state: %v", err)
	}
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{
		VolumeId: v.VolID, CapacityBytes: v.VolSize, VolumeContext: req.GetParameters(), ContentSource: src,
	}}, nil
}

func (d *driver) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	i, v := d.volumeByID(req.GetVolumeId())
	if v == nil {
		return &csi.DeleteVolumeResponse{}, nil // already gone: success, per the spec
	}
	if err := os.RemoveAll(v.VolPath); err != nil {
		return nil, status.Errorf(codes.Internal, "remove %s: %v", v.VolPath, err)
	}
	d.state.Volumes = append(d.state.Volumes[:i], d.state.Volumes[i+1:]...)
	if err := d.save(); err != nil {
		return nil, status.Errorf(codes.Internal, "save state: %v", err)
	}
	return &csi.DeleteVolumeResponse{}, nil
}

func (d *driver) ValidateVolumeCapabilities(_ context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities missing")
	}
	d.mu.Lock()
	_, v := d.volumeByID(req.GetVolumeId())
	d.mu.Unlock()
	if v == nil {
		return nil, status.Errorf(codes.NotFound, "volume %q not found", req.GetVolumeId())
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext: req.GetVolumeContext(), VolumeCapabilities: req.GetVolumeCapabilities(), Parameters: req.GetParameters(),
	}}, nil
}

func (s *snapshot) csi() *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId: s.Id, SourceVolumeId: s.VolID, SizeBytes: s.SizeBytes, ReadyToUse: s.ReadyToUse,
		CreationTime: &timestamppb.Timestamp{Seconds: s.CreationTime.Seconds, Nanos: s.CreationTime.Nanos},
	}
}

func (d *driver) CreateSnapshot(_ context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "name missing")
	}
	if req.GetSourceVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "source volume id missing")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if s := d.snapshotByName(req.GetName()); s != nil {
		if s.VolID != req.GetSourceVolumeId() {
			return nil, status.Errorf(codes.AlreadyExists, "snapshot %q exists for another volume", req.GetName())
		}
		return &csi.CreateSnapshotResponse{Snapshot: s.csi()}, nil
	}
	_, v := d.volumeByID(req.GetSourceVolumeId())
	if v == nil {
		return nil, status.Errorf(codes.NotFound, "source volume %q not found", req.GetSourceVolumeId())
	}
	now := time.Now()
	s := snapshot{
		Name: req.GetName(), Id: newID(), VolID: v.VolID,
		CreationTime: timestamp{Seconds: now.Unix(), Nanos: int32(now.Nanosecond())},
		SizeBytes:    v.VolSize, ReadyToUse: true,
	}
	s.Path = filepath.Join(d.stateDir, s.Id+".snap")
	if err := writeArchive(v.VolPath, s.Path); err != nil {
		_ = os.Remove(s.Path)
		return nil, status.Errorf(codes.Internal, "archive %s: %v", v.VolPath, err)
	}
	d.state.Snapshots = append(d.state.Snapshots, s)
	if err := d.save(); err != nil {
		d.state.Snapshots = d.state.Snapshots[:len(d.state.Snapshots)-1]
		_ = os.Remove(s.Path)
		return nil, status.Errorf(codes.Internal, "save state: %v", err)
	}
	return &csi.CreateSnapshotResponse{Snapshot: s.csi()}, nil
}

func (d *driver) DeleteSnapshot(_ context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if req.GetSnapshotId() == "" {
		return nil, status.Error(codes.InvalidArgument, "snapshot id missing")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	i, s := d.snapshotByID(req.GetSnapshotId())
	if s == nil {
		return &csi.DeleteSnapshotResponse{}, nil
	}
	if err := os.Remove(s.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "remove %s: %v", s.Path, err)
	}
	d.state.Snapshots = append(d.state.Snapshots[:i], d.state.Snapshots[i+1:]...)
	if err := d.save(); err != nil {
		return nil, status.Errorf(codes.Internal, "save state: %v", err)
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

func (d *driver) ListSnapshots(_ context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	d.mu.Lock()
	var all []snapshot
	for _, s := range d.state.Snapshots {
		if (req.GetSnapshotId() == "" || s.Id == req.GetSnapshotId()) &&
			(req.GetSourceVolumeId() == "" || s.VolID == req.GetSourceVolumeId()) {
			all = append(all, s)
		}
	}
	d.mu.Unlock()
	sort.Slice(all, func(i, j int) bool { return all[i].Id < all[j].Id })

	start := 0
	if t := req.GetStartingToken(); t != "" {
		n, err := strconv.Atoi(t)
		if err != nil || n < 0 || n > len(all) {
			return nil, status.Errorf(codes.Aborted, "invalid starting token %q", t)
		}
		start = n
	}
	end := len(all)
	if m := int(req.GetMaxEntries()); m > 0 && start+m < end {
		end = start + m
	}
	resp := &csi.ListSnapshotsResponse{}
	for i := start; i < end; i++ {
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: all[i].csi()})
	}
	if end < len(all) {
		resp.NextToken = strconv.Itoa(end)
	}
	return resp, nil
}

// --- archives and copies ----------------------------------------------------------------------

// writeArchive stores dir as a gzip'd tar with "./"-relative names, like `tar czf out -C dir .`.
func writeArchive(dir, out string) (err error) {
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	zw := gzip.NewWriter(f)
	tw := tar.NewWriter(zw)
	err = filepath.WalkDir(dir, func(p string, de fs.DirEntry, werr error) error {
		if werr != nil {
			return werr
		}
		info, err := de.Info()
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		} else if !info.Mode().IsRegular() && !info.IsDir() {
			return nil // sockets, fifos, devices: not volume data
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		hdr.Name = "./" + filepath.ToSlash(rel)
		if rel == "." {
			hdr.Name = "./"
		} else if info.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			src, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, src)
			src.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return f.Sync()
}

// extractArchive unpacks an archive made by writeArchive (or `tar czf`) into the existing dir.
func extractArchive(archive, dir string) error {
	f, err := os.Open(archive)
	if err != nil {
		return err
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return err
	}
	tr := tar.NewReader(zr)
	var dirs []*tar.Header
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		name := filepath.Clean(filepath.FromSlash(hdr.Name))
		if name == "." {
			dirs = append(dirs, &tar.Header{Name: ".", Mode: hdr.Mode, ModTime: hdr.ModTime, Uid: hdr.Uid, Gid: hdr.Gid})
			continue
		}
		if !filepath.IsLocal(name) {
			return fmt.Errorf("archive entry %q leaves the volume", hdr.Name)
		}
		p := filepath.Join(dir, name)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o700); err != nil {
				return err
			}
			h := *hdr
			h.Name = name
			dirs = append(dirs, &h)
			continue
		case tar.TypeReg:
			out, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return err
			}
			_, err = io.Copy(out, tr)
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := os.Symlink(hdr.Linkname, p); err != nil {
				return err
			}
		case tar.TypeLink:
			target := filepath.Clean(filepath.FromSlash(hdr.Linkname))
			if !filepath.IsLocal(target) {
				return fmt.Errorf("archive hard link %q leaves the volume", hdr.Linkname)
			}
			if err := os.Link(filepath.Join(dir, target), p); err != nil {
				return err
			}
			continue
		default:
			continue
		}
		if err := setMeta(p, hdr.Typeflag == tar.TypeSymlink, modeBits(hdr.FileInfo().Mode()), hdr.Uid, hdr.Gid, hdr.ModTime); err != nil {
			return err
		}
	}
	// Directories last and deepest first, so filling them does not reset their times.
	for i := len(dirs) - 1; i >= 0; i-- {
		h := dirs[i]
		p := filepath.Join(dir, h.Name)
		if err := setMeta(p, false, modeBits(h.FileInfo().Mode()), h.Uid, h.Gid, h.ModTime); err != nil {
			return err
		}
	}
	return nil
}

// copyTree copies the contents of src into the existing dir dst, like `cp -a src/. dst/`.
func copyTree(src, dst string) error {
	type dirMeta struct {
		path string
		info fs.FileInfo
	}
	var dirs []dirMeta
	err := filepath.WalkDir(src, func(p string, de fs.DirEntry, werr error) error {
		if werr != nil {
			return werr
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		info, err := de.Info()
		if err != nil {
			return err
		}
		q := filepath.Join(dst, rel)
		switch {
		case info.IsDir():
			if rel != "." {
				if err := os.Mkdir(q, 0o700); err != nil {
					return err
				}
			}
			dirs = append(dirs, dirMeta{q, info})
			return nil
		case info.Mode()&fs.ModeSymlink != 0:
			link, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if err := os.Symlink(link, q); err != nil {
				return err
			}
		case info.Mode().IsRegular():
			if err := copyFile(p, q); err != nil {
				return err
			}
		default:
			return nil
		}
		uid, gid := owner(info)
		return setMeta(q, info.Mode()&fs.ModeSymlink != 0, modeBits(info.Mode()), uid, gid, info.ModTime())
	})
	if err != nil {
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		uid, gid := owner(dirs[i].info)
		if err := setMeta(dirs[i].path, false, modeBits(dirs[i].info.Mode()), uid, gid, dirs[i].info.ModTime()); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

func owner(info fs.FileInfo) (int, int) {
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid), int(st.Gid)
	}
	return -1, -1
}

// modeBits keeps permissions and the set-user-id, set-group-id and sticky bits, as a real
// driver's copy (tar, cp -a) does.
func modeBits(m fs.FileMode) fs.FileMode {
	return m & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
}

// setMeta restores ownership (only as root; others cannot chown), mode and mtime.
func setMeta(p string, symlink bool, perm fs.FileMode, uid, gid int, mtime time.Time) error {
	if os.Geteuid() == 0 && uid >= 0 {
		if err := os.Lchown(p, uid, gid); err != nil {
			return err
		}
	}
	if symlink {
		return nil // Linux has no lchmod, and link times do not matter here
	}
	if err := os.Chmod(p, perm); err != nil {
		return err
	}
	return os.Chtimes(p, mtime, mtime)
}
